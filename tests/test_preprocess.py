"""Preprocessing: shards read back by megatron-core equal encode(doc)+[eod]; bad input is named."""
import filecmp
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDataset
from megagpt.data.preprocess import preprocess
from megagpt.errors import MegaGPTError
from megagpt.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    return MegatronIndexedDataset(prefix)


def paragraphs(text):
    """Independent statement of the paragraph rule: runs of non-blank lines."""
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out + (["\n".join(cur)] if cur else [])


def assert_shard_is(prefix, docs, tok, eod=True):
    """megatron-core and our reader both see exactly encode(doc) (+ eod) per document, byte for byte."""
    expected = [tok.encode(d) + ([tok.eod_id] if eod else []) for d in docs]
    mg, ours = megatron_dataset(prefix), IndexedDataset(prefix)
    assert len(mg) == len(ours) == len(expected)
    assert mg.sequence_lengths.tolist() == ours.sizes.tolist() == [len(e) for e in expected]
    assert mg.document_indices.tolist() == ours.doc_idx.tolist() == list(range(len(expected) + 1))
    for i, e in enumerate(expected):
        assert mg[i].tolist() == ours[i].tolist() == e
    flat = np.concatenate([np.asarray(e, dtype=ours.dtype) for e in expected]) if expected else b""
    assert Path(prefix + ".bin").read_bytes() == bytes(flat)


@pytest.fixture(scope="module")
def tok(sp_model):
    return load_tokenizer(sp_model)


@pytest.fixture(scope="module")
def lines(shakespeare_txt):
    return [l for l in shakespeare_txt.read_text(encoding="utf-8").splitlines() if l.strip()]


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_shakespeare_fixture_matches_megatron_core(shakespeare_prefix, shakespeare_txt, tok):
    docs = paragraphs(shakespeare_txt.read_text(encoding="utf-8"))
    assert len(docs) > 7000
    assert IndexedDataset(shakespeare_prefix).dtype == np.uint16
    assert_shard_is(shakespeare_prefix, docs, tok)


def test_jsonl_two_keys_gz_folder_and_worker_invariance(tmp_path, sp_model, tok, lines):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    recs = [{"title": lines[i], "text": "\n".join(lines[i:i + 5]), "n": i} for i in range(0, 1500, 5)]
    write_jsonl(src / "b.jsonl", recs[:150])
    write_jsonl(src / "sub" / "c.jsonl.gz", recs[150:], gz=True)
    write_jsonl(src / "a.json", [{"title": "first", "text": "file a comes first"}])
    outs = {}
    for w in (1, 2):
        s = preprocess([str(src)], str(tmp_path / f"w{w}"), sp_model, json_keys=("text", "title"),
                       workers=w, chunk_bytes=4096)  # many small chunks: ordering across workers matters
        assert s.docs == 2 * 301 and s.empty_docs == 0 and s.bad_lines == 0
        assert s.output_prefixes == [str(tmp_path / f"w{w}_text_document"), str(tmp_path / f"w{w}_title_document")]
        outs[w] = s
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(f"{tmp_path}/w1_{key}_document{ext}", f"{tmp_path}/w2_{key}_document{ext}", shallow=False)
    ordered = [{"title": "first", "text": "file a comes first"}] + recs  # a.json, b.jsonl, sub/c.jsonl.gz
    assert_shard_is(f"{tmp_path}/w2_text_document", [r["text"] for r in ordered], tok)
    assert_shard_is(f"{tmp_path}/w2_title_document", [r["title"] for r in ordered], tok)
    # a glob selects the same files as the folder
    s = preprocess([str(src / "**" / "*.json*")], str(tmp_path / "glob"), sp_model, workers=1)
    assert filecmp.cmp(f"{tmp_path}/glob_text_document.bin", f"{tmp_path}/w1_text_document.bin", shallow=False)


def test_txt_one_doc_per_file_no_eod_and_empty_docs(tmp_path, sp_model, tok, lines):
    docs = ["\n".join(lines[:30]) + "\n", "  spaced\n\nout  ", "\n".join(lines[30:60])]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "doc3.txt").write_text(" \n\t\n", encoding="utf-8")  # whitespace only: skipped
    s = preprocess([str(tmp_path / "doc*.txt")], str(tmp_path / "out"), sp_model, append_eod=False)
    assert (s.docs, s.empty_docs) == (3, 1)
    assert s.tokens == sum(len(tok.encode(d)) for d in docs)
    assert_shard_is(str(tmp_path / "out_text_document"), docs, tok, eod=False)
    with pytest.raises(MegaGPTError, match=r"doc0.txt has no json keys \['title'\]"):
        preprocess([str(tmp_path)], str(tmp_path / "k"), sp_model, json_keys=("title",))


def test_shard_size_tokens(tmp_path, sp_model, tok, lines, shakespeare_prefix):
    text = "\n\n".join(lines[:2000])
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    s = preprocess([str(tmp_path / "in.txt")], str(tmp_path / "sh"), sp_model, split_paragraphs=True,
                   shard_size_tokens=5000)
    assert len(s.output_prefixes) > 2
    assert s.output_prefixes[0] == str(tmp_path / "sh_text_document_00000")
    shards = [IndexedDataset(p) for p in s.output_prefixes]
    assert all(sh.num_tokens >= 5000 for sh in shards[:-1])
    assert all(sh.num_tokens - int(sh.sizes[-1]) < 5000 for sh in shards)  # rolled right after crossing
    got = [seq.tolist() for sh in shards for seq in (sh[i] for i in range(len(sh)))]
    assert got == [tok.encode(d) + [tok.eod_id] for d in lines[:2000]]
    assert sum(sh.num_documents for sh in shards) == s.docs == 2000
    del shards
    with pytest.warns(UserWarning, match=r"shard\(s\) from an earlier run remain.*sh_text_document_00001.idx"):
        again = preprocess([str(tmp_path / "in.txt")], str(tmp_path / "sh"), sp_model, split_paragraphs=True,
                           shard_size_tokens=10**9)
    assert again.output_prefixes == [str(tmp_path / "sh_text_document_00000")]


def test_gpt2_tokenizer_output(tmp_path, shared_data, lines):
    gpt2 = shared_data / "tokenizers" / "gpt2"
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": l} for l in lines[:50]] + [{"text": "Hello world"}])
    preprocess([src], str(tmp_path / "g"), str(gpt2))
    ds = IndexedDataset(str(tmp_path / "g_text_document"))
    assert ds[50].tolist() == [15496, 995, 50256]
    assert_shard_is(str(tmp_path / "g_text_document"), lines[:50] + ["Hello world"], load_tokenizer(gpt2))


GOOD = json.dumps({"text": "good line"})
BAD_CASES = {
    "malformed": (GOOD + "\n" + '{"text": "unterminated' + "\n", 2, "malformed JSON"),
    "not_object": (GOOD + "\n" + GOOD + "\n" + '["text"]' + "\n", 3, "JSON line is a list, expected an object"),
    "missing_key": (GOOD + "\n" + json.dumps({"body": "x"}) + "\n", 2, "missing key 'text' (keys present: 'body')"),
    "non_string": (json.dumps({"text": None}) + "\n" + GOOD + "\n", 1, "key 'text' holds a NoneType"),
    "lone_surrogate": (GOOD + "\n" + r'{"text": "good line \ud83d\ude00"}' + "\n" + r'{"text": "a\ud800b"}' + "\n", 3,
                       r"key 'text' holds an unpaired surrogate escape (\ud800)"),
    "bad_utf8": (GOOD + "\n\n" + '{"text": "caf\xff"}' + "\n", 3, "invalid UTF-8 (byte 0xff at column 14)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_jsonl_lines(tmp_path, sp_model, case):
    content, line, msg = BAD_CASES[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(content.encode("utf-8").replace(b"\xc3\xbf", b"\xff"))  # raw invalid byte for bad_utf8
    out = tmp_path / "out" / "p"
    with pytest.raises(MegaGPTError) as e:
        preprocess([str(src)], str(out), sp_model, workers=2)
    assert f"{src}:{line}: {msg}" in str(e.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing, not even temps
    s = preprocess([str(src)], str(out), sp_model, skip_bad_lines=True)
    assert s.bad_lines == 1 and s.docs == content.count("good line")
    assert IndexedDataset(str(out) + "_text_document").num_documents == s.docs


def test_bad_utf8_in_txt_paragraph_and_unreadable_inputs(tmp_path, sp_model):
    src = tmp_path / "t.txt"
    src.write_bytes(b"para one\n\nline a\nline \xfe b\n\nlast\n")
    with pytest.raises(MegaGPTError, match=r"t.txt:4: invalid UTF-8 \(byte 0xfe at column 6\)"):
        preprocess([str(src)], str(tmp_path / "o"), sp_model, split_paragraphs=True)
    s = preprocess([str(src)], str(tmp_path / "o"), sp_model, split_paragraphs=True, skip_bad_lines=True)
    assert (s.docs, s.bad_lines) == (2, 1)
    with pytest.raises(MegaGPTError, match="absent.jsonl: no such file or folder"):
        preprocess([str(tmp_path / "absent.jsonl")], str(tmp_path / "o"), sp_model)
    broken = tmp_path / "broken.jsonl.gz"
    full = gzip.compress("".join(json.dumps({"text": f"line {i} " * 3}) + "\n" for i in range(3000)).encode())
    broken.write_bytes(full[: len(full) // 2])  # truncated stream
    with pytest.raises(MegaGPTError, match="broken.jsonl.gz: read failed"):
        preprocess([str(broken)], str(tmp_path / "z"), sp_model, workers=2)
    assert not list(tmp_path.glob("z*"))


def test_failure_late_in_a_sharded_run_leaves_nothing(tmp_path, sp_model, lines):
    recs = [{"text": l} for l in lines[:3000]]
    src = write_jsonl(tmp_path / "in.jsonl", recs + ["{oops"])
    with pytest.raises(MegaGPTError, match=r"in.jsonl:3001: malformed JSON"):
        preprocess([src], str(tmp_path / "out"), sp_model, shard_size_tokens=2000, workers=2, chunk_bytes=8192)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_cli(tmp_path, sp_model, lines, capsys):
    script = str(REPO / "tools" / "preprocess_data.py")
    h = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert h.returncode == 0
    for flag in ("--input", "--output-prefix", "--tokenizer-model", "--json-keys", "--workers", "--append-eod",
                 "--no-append-eod", "--split-paragraphs", "--skip-bad-lines", "--shard-size-tokens"):
        assert flag in h.stdout
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": l} for l in lines[:20]] + ["not json"])
    args = [sys.executable, script, "--input", src, "--output-prefix", str(tmp_path / "c"),
            "--tokenizer-model", sp_model, "--workers", "2"]
    bad = subprocess.run(args, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith(f"error: {src}:21: malformed JSON")
    tool = load_script("preprocess_data")  # the successful run in-process: a subprocess costs seconds of imports
    tool.main(args[2:] + ["--skip-bad-lines", "--no-append-eod"])
    out = capsys.readouterr().out
    assert "20 docs" in out and "1 bad lines skipped" in out
    assert IndexedDataset(str(tmp_path / "c_text_document")).num_tokens == sum(
        len(load_tokenizer(sp_model).encode(l)) for l in lines[:20])


def _die(chunk):
    os._exit(3)  # what the OOM killer does to a worker


def test_dead_worker_fails_the_run_instead_of_hanging(tmp_path, sp_model, lines, monkeypatch):
    import megagpt.data.preprocess as pre

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": l} for l in lines[:200]])
    monkeypatch.setattr(pre, "encode_chunk", _die)
    with pytest.raises(MegaGPTError, match="a preprocessing worker died"):
        preprocess([src], str(tmp_path / "out"), sp_model, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
