"""Inputs that give the data tools nothing to work with, and outputs they cannot write: each is one
error line naming the file, prefix or split (never a traceback, never a silent success)."""
import json
import os

import numpy as np
import pytest
from test_preprocess import load_script

from megagpt.data import DataConfig, build_gpt_datasets
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.data.preprocess import preprocess
from megagpt.errors import MegaGPTError
from megagpt.tokenizer import expand_inputs, train_sentencepiece


def cli_error(capsys, name, *args) -> str:
    """Run a tool's main in-process; it must exit 2 with exactly one ``error:`` line, returned."""
    with pytest.raises(SystemExit) as e:
        load_script(name).main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def shard(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def test_inputs_expand_in_order_once_each(tmp_path):
    for name in ("b.txt", "a.jsonl", ".hidden", "s.bin"):
        (tmp_path / name).write_text("x")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")
    assert expand_inputs([b, str(tmp_path), str(tmp_path / "*.txt"), a]) == [b, a]  # folders skip hidden files, shards


def test_empty_train_split_is_one_error_naming_prefix_and_split(tmp_path):
    empty = shard(tmp_path / "nodocs", [])
    with pytest.raises(MegaGPTError, match=r"train split.*nodocs.*969,30,1") as e:
        build_gpt_datasets(DataConfig([empty], seq_length=8), (10, 0, 0), vocab_size=100)
    assert "\n" not in str(e.value)
    some = shard(tmp_path / "some", [[1, 2, 3]] * 20)
    with pytest.raises(MegaGPTError, match=r"train split.*some.*0,1,0"):
        build_gpt_datasets(DataConfig([some], split="0,1,0", seq_length=2), (10, 5, 0), vocab_size=100)
    blank = shard(tmp_path / "blank", [[]] * 5)  # documents, but not one token in them
    with pytest.raises(MegaGPTError, match=r"blank: documents \[0, 5\) hold no tokens"):
        build_gpt_datasets(DataConfig([blank], split="1,0,0", seq_length=2), (10, 0, 0), vocab_size=100)
    # an empty valid/test split is allowed: no evaluation, no dataset
    assert build_gpt_datasets(DataConfig([some], split="1,0,0", seq_length=2), (10, 5, 0), 100)[1:] == (None, None)


def test_preprocess_refuses_inputs_without_documents_and_warns_per_empty_file(tmp_path, sp_model, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.txt").write_text(" \n\n")
    for src in (tmp_path / "empty.jsonl", folder):
        with pytest.raises(MegaGPTError, match=rf"no documents in {src}"):
            preprocess([str(src)], str(tmp_path / "out" / "x"), sp_model)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    line = cli_error(capsys, "preprocess_data", "--input", tmp_path / "empty.jsonl", "--tokenizer-model", sp_model,
                     "--output-prefix", tmp_path / "cli", "--workers", 1)
    assert "empty.jsonl" in line and not list(tmp_path.glob("cli*"))
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "some words"}) + "\n")
    with pytest.warns(UserWarning, match=r"empty.jsonl: no documents") as w:
        s = preprocess([str(tmp_path / "empty.jsonl"), str(tmp_path / "good.jsonl")], str(tmp_path / "ok"), sp_model)
    assert s.docs == 1 and not any("good.jsonl" in str(x.message) for x in w)


def test_train_tokenizer_on_empty_input_and_counts_skipped_lines(tmp_path, shakespeare_txt, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MegaGPTError, match=r"empty.jsonl.*no text to train on") as e:
        train_sentencepiece([str(tmp_path / "empty.jsonl")], str(tmp_path / "t"), vocab_size=300)
    assert "\n" not in str(e.value) and "INTERNAL" not in str(e.value)
    assert "empty.jsonl" in cli_error(capsys, "train_tokenizer", "--input", tmp_path / "empty.jsonl",
                                      "--vocab-size", 300, "--output-prefix", tmp_path / "cli")
    lines = shakespeare_txt.read_text(encoding="utf-8").splitlines()[:3000]
    src = tmp_path / "mixed.jsonl"
    bad = ["{oops", json.dumps({"other": "x"}), json.dumps({"text": 5})]
    src.write_text("\n".join([json.dumps({"text": l}) for l in lines] + bad + [json.dumps({"text": "w" * 5000})]))
    with pytest.warns(UserWarning, match=r"mixed.jsonl: 4 lines skipped: 3 unreadable.*, 1 longer than 4192 bytes"):
        train_sentencepiece([str(src)], str(tmp_path / "m"), vocab_size=400)


def unwritable(tmp_path):
    """An output location no process can write, root included: a path below a regular file."""
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path / "afile" / "out"


def test_unwritable_output_is_one_line_naming_it(tmp_path, shakespeare_txt, shakespeare_prefix, sp_model, capsys):
    out = unwritable(tmp_path)
    line = cli_error(capsys, "preprocess_data", "--input", shakespeare_txt, "--tokenizer-model", sp_model,
                     "--output-prefix", out, "--workers", 1)
    assert f"{out}_text_document: cannot write" in line
    line = cli_error(capsys, "merge_datasets", "--input", shakespeare_prefix, "--output-prefix", out)
    assert f"{out}: cannot write" in line
    line = cli_error(capsys, "train_tokenizer", "--input", shakespeare_txt, "--vocab-size", 300,
                     "--output-prefix", out)
    assert f"{out}: cannot write" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_folder_is_one_line(tmp_path, shakespeare_prefix, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        line = cli_error(capsys, "merge_datasets", "--input", shakespeare_prefix, "--output-prefix", ro / "m")
    finally:
        ro.chmod(0o700)
    assert f"{ro / 'm'}: cannot write" in line and "Permission denied" in line


def test_a_json_key_given_twice_is_refused_before_any_output(tmp_path, sp_model, shakespeare_txt, capsys):
    """``--json-keys text text`` wrote every document twice into the same shard."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "some words"}) + "\n")
    line = cli_error(capsys, "preprocess_data", "--input", tmp_path / "d.jsonl", "--json-keys", "text", "text",
                     "--tokenizer-model", sp_model, "--output-prefix", tmp_path / "out" / "x")
    assert line == "error: --json-keys: 'text' is given twice" and not (tmp_path / "out").exists()
    line = cli_error(capsys, "train_tokenizer", "--input", tmp_path / "d.jsonl", "--json-keys", "text", "text",
                     "--vocab-size", 300, "--output-prefix", tmp_path / "tok" / "t")
    assert line == "error: --json-keys: 'text' is given twice" and not (tmp_path / "tok").exists()
