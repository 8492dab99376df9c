"""Tokenizer: sentencepiece training with fixed specials, round trips, GPT-2 BPE vs transformers."""
import gzip
import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.errors import MegaGPTError
from megagpt.tokenizer import load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
UNSEEN = ["emoji 😀🚀 end", "日本語のテキスト", "Ελληνικά и кириллица", "tabs\tand  double  spaces ",
          "  leading and trailing  ", "line one\nline two\n\n", "ünïcödé façade — “quotes”"]


@pytest.fixture(scope="module")
def sp(sp_model):
    return load_tokenizer(sp_model)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return load_tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def shakespeare_lines(shakespeare_txt):
    return shakespeare_txt.read_text(encoding="utf-8").splitlines()


def test_special_ids_are_fixed(sp):
    assert (sp.pad_id, sp.unk_id, sp.bos_id, sp.eos_id, sp.delim_id, sp.cls_id) == (0, 1, 2, 3, 4, 5)
    assert sp.eod_id == sp.eos_id == 3
    assert [sp.sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<unk>", "<s>", "</s>", "<delim>", "<cls>"]
    assert sp.vocab_size == 1000
    assert sp.spec() == {"type": "sentencepiece", "path": sp.path}


def test_round_trip_shakespeare_and_unseen_chars(sp, shakespeare_lines):
    lines = shakespeare_lines[:3000]
    for line, ids in zip(lines, sp.encode_batch(lines)):
        assert sp.decode(ids) == line
    paragraph = "\n".join(shakespeare_lines[:40])
    assert sp.decode(sp.encode(paragraph)) == paragraph
    for text in UNSEEN:  # byte fallback: never <unk>, always reversible
        ids = sp.encode(text)
        assert sp.unk_id not in ids, text
        assert sp.decode(ids) == text
        assert all(0 <= i < sp.vocab_size for i in ids)


def test_literal_special_strings_stay_text(sp, gpt2):
    text = "<s> </s> <pad> <unk> <delim> <cls> <|endoftext|>"
    for tok in (sp, gpt2):
        ids = tok.encode(text)
        specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.delim_id, tok.cls_id}
        assert not specials & set(ids), (tok, ids)
        assert tok.decode(ids) == text
    # inserted by id (as finetune transforms do), they decode to nothing
    a, b = sp.encode("premise"), sp.encode("hypothesis")
    assert sp.decode(a + [sp.delim_id] + b + [sp.cls_id]) == sp.decode(a + b) == "premise hypothesis"


def test_unigram_jsonl_gz_sampling_and_no_byte_fallback(tmp_path, shakespeare_lines):
    src = tmp_path / "part.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for i in range(0, 4000, 4):
            f.write(json.dumps({"body": "\n".join(shakespeare_lines[i:i + 4]), "id": i}) + "\n")
    model = train_sentencepiece([str(tmp_path)], str(tmp_path / "uni"), vocab_size=600, model_type="unigram",
                                json_keys=("body",), input_sentence_size=2000)
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    assert proto.trainer_spec.input_sentence_size == 2000
    tok = load_tokenizer(model)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.delim_id, tok.cls_id) == (0, 1, 2, 3, 4, 5)
    line = shakespeare_lines[10]
    assert tok.decode(tok.encode(line)) == line

    no_fb = load_tokenizer(train_sentencepiece([str(src)], str(tmp_path / "nofb"), vocab_size=300,
                                               json_keys=("body",), byte_fallback=False))
    assert no_fb.unk_id in no_fb.encode("emoji 😀")  # without byte fallback unseen chars are <unk>


def test_gpt2_matches_transformers(gpt2, shared_data, shakespeare_lines):
    from transformers import GPT2Tokenizer

    d = shared_data / "tokenizers" / "gpt2"
    merges = [tuple(line.split()) for line in (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    ref = GPT2Tokenizer(vocab=json.loads((d / "encoder.json").read_text(encoding="utf-8")), merges=merges)
    assert gpt2.encode("Hello world") == [15496, 995]
    texts = shakespeare_lines[:500] + UNSEEN
    assert gpt2.encode_batch(texts) == [ref(t)["input_ids"] for t in texts]
    for t in texts:
        assert gpt2.decode(gpt2.encode(t)) == t
    assert gpt2.vocab_size == 50260
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.eod_id) == (50256, 50256, 50256)
    assert (gpt2.pad_id, gpt2.delim_id, gpt2.cls_id) == (50257, 50258, 50259)
    assert gpt2.spec()["type"] == "gpt2-bpe"


def test_pickle_round_trip(sp, gpt2):
    for tok in (sp, gpt2):
        clone = pickle.loads(pickle.dumps(tok))
        text = "To be, or not to be <|endoftext|> 😀"
        assert clone.encode(text) == tok.encode(text)
        assert clone.vocab_size == tok.vocab_size and clone.spec() == tok.spec()


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(MegaGPTError, match="nope.model: tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(MegaGPTError, match="lacks encoder.json and vocab.bpe"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(MegaGPTError, match="junk.model: not a valid sentencepiece model"):
        load_tokenizer(junk)
    with pytest.raises(MegaGPTError, match="missing-input: no such file"):
        train_sentencepiece([str(tmp_path / "missing-input")], str(tmp_path / "t"), vocab_size=500)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\nfoo bar\n", encoding="utf-8")
    with pytest.raises(MegaGPTError, match=r"tiny.txt failed: .*Vocabulary size too high \(3000\)"):
        train_sentencepiece([str(tiny)], str(tmp_path / "t"), vocab_size=3000)
    broken = tmp_path / "broken.jsonl.gz"
    full = gzip.compress("".join(json.dumps({"text": f"line {i} w{i % 97} " * 3}) + "\n" for i in range(20000)).encode())
    broken.write_bytes(full[: len(full) // 2])
    with pytest.raises(MegaGPTError) as e:  # raised inside sentencepiece's C++ loop, still one clean line
        train_sentencepiece([str(broken)], str(tmp_path / "t"), vocab_size=400)
    assert str(e.value).startswith(f"{broken}: read failed: Compressed file ended") and "\n" not in str(e.value)


def test_cli(tmp_path, shakespeare_lines, capsys):
    script = str(REPO / "tools" / "train_tokenizer.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--input", "--json-keys", "--vocab-size", "--output-prefix", "--model-type",
                 "--byte-fallback", "--no-byte-fallback", "--input-sentence-size", "--workers"):
        assert flag in out.stdout
    src = tmp_path / "small.txt"
    src.write_text("\n".join(shakespeare_lines[:2000]), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("train_tokenizer_tool", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # the successful run in-process: a subprocess costs seconds of imports
    tool.main(["--input", str(src), "--vocab-size", "400", "--output-prefix", str(tmp_path / "cli"), "--workers", "1"])
    assert "pad=0 unk=1 bos=2 eos=3 (eod=3) delim=4 cls=5" in capsys.readouterr().out
    assert (tmp_path / "cli.model").is_file() and (tmp_path / "cli.vocab").is_file()
    bad = subprocess.run([sys.executable, script, "--input", str(tmp_path / "absent.txt"), "--vocab-size", "400",
                          "--output-prefix", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "absent.txt: no such file or folder" in bad.stderr


@pytest.fixture(scope="module")
def gpt2_json_dir(tmp_path_factory, shared_data):
    """GPT-2 as one HF ``tokenizer.json`` (saved by transformers from the shared files), nothing else."""
    from transformers import GPT2TokenizerFast

    d, slow = tmp_path_factory.mktemp("gpt2json"), tmp_path_factory.mktemp("gpt2files")
    src = shared_data / "tokenizers" / "gpt2"
    (slow / "vocab.json").write_bytes((src / "encoder.json").read_bytes())
    (slow / "merges.txt").write_bytes((src / "vocab.bpe").read_bytes())
    GPT2TokenizerFast.from_pretrained(str(slow)).save_pretrained(str(d))
    assert len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) == 50257
    for f in d.iterdir():
        if f.name != "tokenizer.json":
            f.unlink()
    return d


def test_gpt2_from_tokenizer_json_gives_the_same_ids_and_shards(gpt2, gpt2_json_dir, shakespeare_txt, tmp_path):
    import numpy as np

    from megagpt.data.preprocess import preprocess

    tj = load_tokenizer(gpt2_json_dir)
    assert (tj.type, tj.files, tj.vocab_size, tj.eos_id, tj.pad_id) == \
        ("gpt2-bpe", ("tokenizer.json",), gpt2.vocab_size, gpt2.eos_id, gpt2.pad_id)
    texts = shakespeare_txt.read_text(encoding="utf-8")[:200_000].split("\n\n") + UNSEEN + ["<|endoftext|> literal"]
    assert tj.encode_batch(texts) == gpt2.encode_batch(texts) == gpt2.encode_batch_hf(texts)
    assert tj.decode(tj.encode(UNSEEN[0])) == UNSEEN[0]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    for name, tok in (("pair", gpt2.path), ("json", str(gpt2_json_dir))):
        preprocess([str(corpus)], str(tmp_path / name), tok, workers=2)
    for ext in (".bin", ".idx"):
        a, b = (np.fromfile(tmp_path / f"{n}_text_document{ext}", dtype=np.uint8) for n in ("pair", "json"))
        assert np.array_equal(a, b), ext


def test_tokenizer_json_travels_with_checkpoints_and_exports(gpt2_json_dir, tmp_path):
    from transformers import AutoTokenizer

    from megagpt.checkpoint.tokenizer_files import bundled_tokenizer, write_tokenizer
    from megagpt.export.hf_tokenizer import export_tokenizer

    write_tokenizer(gpt2_json_dir, tmp_path / "ckpt" / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "tokenizer").iterdir()) == ["spec.json", "tokenizer.json"]
    inside = load_tokenizer(bundled_tokenizer(tmp_path / "ckpt"))
    assert inside.fingerprint() == load_tokenizer(gpt2_json_dir).fingerprint()
    (tmp_path / "hf").mkdir()
    export_tokenizer(gpt2_json_dir, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert [hf.encode(t, add_special_tokens=False) for t in UNSEEN] == inside.encode_batch(UNSEEN)


def test_tokenizer_json_of_another_model_is_one_line(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models

    HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MegaGPTError, match="tokenizer.json: a WordLevel model, not GPT-2's byte-level BPE"):
        load_tokenizer(tmp_path)
