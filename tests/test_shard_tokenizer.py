"""A shard says which tokenizer made it (PREFIX.meta.json: the tokenizer's sha256), so a shard made
with another tokenizer — even one of the same vocabulary size, whose ids all look valid — stops
pretraining at config load with one line, and merge_datasets refuses to mix tokenizers. Shards
made elsewhere (no metadata: megatron, older megagpt) still train."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from megagpt.config import load_config
from megagpt.data.indexed import meta_path
from megagpt.data.preprocess import preprocess
from megagpt.errors import MegaGPTError
from megagpt.tokenizer import load_tokenizer, train_sentencepiece
from test_train_runs import REPO


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory, shared_data):
    """A second real tokenizer with the fixture's vocabulary size (1000), trained on other text."""
    out = tmp_path_factory.mktemp("tok2") / "sst2"
    train_sentencepiece([str(shared_data / "glue" / "SST-2" / "train.tsv")], str(out), vocab_size=1000,
                        model_type="bpe")
    return str(out) + ".model"


def config(tmp_path, prefix, tok):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"preset": "tiny", "max_seq_len": 64},
                                 "data": {"data_path": [prefix], "tokenizer": tok, "seq_length": 64}}))
    return p


def test_shards_made_with_another_tokenizer_are_refused(tmp_path, shakespeare_prefix, sp_model, other_tok):
    meta = json.loads(open(meta_path(shakespeare_prefix)).read())
    assert meta["tokenizer"]["sha256"] == load_tokenizer(sp_model).fingerprint()
    assert load_tokenizer(other_tok).vocab_size == load_tokenizer(sp_model).vocab_size
    load_config(config(tmp_path, shakespeare_prefix, sp_model))             # the right one loads
    with pytest.raises(MegaGPTError, match=r"key 'data.tokenizer': .*meta.json: shard made with tokenizer") as e:
        load_config(config(tmp_path, shakespeare_prefix, other_tok))
    assert e.value.key == "data.tokenizer" and len(str(e.value).splitlines()) == 1


def test_shards_without_metadata_still_load(tmp_path, shakespeare_prefix, other_tok):
    for ext in (".bin", ".idx"):
        os.symlink(shakespeare_prefix + ext, tmp_path / f"plain{ext}")
    load_config(config(tmp_path, str(tmp_path / "plain"), other_tok))


def test_merge_refuses_shards_of_different_tokenizers(tmp_path, shakespeare_txt, shakespeare_prefix, other_tok):
    preprocess([str(shakespeare_txt)], str(tmp_path / "o"), other_tok, workers=1)
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input", shakespeare_prefix,
                        str(tmp_path / "o_text_document"), "--output-prefix", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "were made with different tokenizers" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("m.*"))
    ok = subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input", shakespeare_prefix,
                         "--output-prefix", str(out)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads((tmp_path / "m.meta.json").read_text()) == \
        json.loads(open(meta_path(shakespeare_prefix)).read())
