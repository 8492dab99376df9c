"""Finetuning and evaluation never overwrite a user's output without --force, and refuse a bad output
path or input file before any work: one ``error:`` line naming it (exit 2, no traceback), the
existing file or folder untouched. Real CLI runs (megagpt/finetune/run.py, tools/evaluate.py,
python -m megagpt.eval.lambada) on a random model and a 60/30-line cut of RTE."""
import json
import os
import subprocess
import sys

import pytest

from test_tool_outputs import ENV, refused
from test_train_runs import REPO

TOKENIZER = REPO / "tests" / "fixtures" / "legacy_v0" / "tokenizer.model"   # sentencepiece, vocab 400


def cli(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, (script, *args))], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def one_error(r, *parts):
    """Exit 2 with a single ``error:`` line holding every one of ``parts``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(p in lines[0] for p in parts), r.stderr
    return True


@pytest.fixture(scope="module")
def rte_root(tmp_path_factory, shared_data):
    """glue/RTE with train.tsv / dev.tsv cut to their first 60 / 30 lines."""
    root = tmp_path_factory.mktemp("ftdata")
    (root / "glue" / "RTE").mkdir(parents=True)
    for name, n in (("train.tsv", 60), ("dev.tsv", 30)):
        lines = (shared_data / "glue" / "RTE" / name).read_text().splitlines(keepends=True)
        (root / "glue" / "RTE" / name).write_text("".join(lines[:n]))
    return root


def finetune(rte_root, save, *extra):
    return cli(REPO / "megagpt" / "finetune" / "run.py", "--task", "rte", "--init", "random", "--tokenizer",
               TOKENIZER, "--data-root", rte_root, "--save", save, "--epochs", "1", "--batch-size", "4",
               "--seq-length", "32", "--train-limit", "8", "--eval-limit", "8", "--log-interval", "0", *extra)


def test_finetune_refuses_to_replace_an_earlier_run_without_force(tmp_path, rte_root):
    save = tmp_path / "ok"
    (save / "best").mkdir(parents=True)
    (save / "best" / "finetune.json").write_text("mine")
    (save / "history.json").write_text("mine too")
    r = finetune(rte_root, save)
    assert one_error(r, f"--save {save}", f"{save}: already holds a finetuning run (best/, history.json); "
                                          f"pass --force to replace it")
    assert "task rte" not in r.stdout                     # refused before the data was even read
    assert (save / "best" / "finetune.json").read_text() == "mine" and (save / "history.json").read_text() == "mine too"
    forced = finetune(rte_root, save, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((save / "history.json").read_text())["best"]["epoch"] == 1
    info = json.loads((save / "best" / "finetune.json").read_text())
    assert info["task"] == "rte" and info["finetune_config"]["force"] is True
    alone = tmp_path / "history_only"                     # either file alone is an earlier run
    alone.mkdir()
    (alone / "history.json").write_text("mine")
    assert one_error(finetune(rte_root, alone), f"{alone}: already holds a finetuning run (history.json)")


def test_finetune_refuses_a_file_as_save_dir_before_training(tmp_path, rte_root):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "mine"}\n')
    for extra in ((), ("--force",)):                      # --force replaces a run, never a file
        r = finetune(rte_root, corpus, *extra)
        assert one_error(r, f"--save {corpus}", f"{corpus}: is a file, not a directory")
        assert "task rte" not in r.stdout and corpus.read_text() == '{"text": "mine"}\n'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megagpt.eval.parity import random_checkpoint

    return random_checkpoint("tiny-modern", tmp_path_factory.mktemp("evalck") / "cons", str(TOKENIZER))


def evaluate(ckpt, shared_data, *extra):
    return cli(REPO / "tools" / "evaluate.py", ckpt, "--data-dir", shared_data, "--limit", "4", *extra)


def test_evaluate_refuses_an_existing_output_then_forces(tmp_path, ckpt, shared_data):
    pytest.importorskip("lm_eval")
    out = tmp_path / "eout.json"
    out.write_text("mine")
    r = evaluate(ckpt, shared_data, "--tasks", "copa_local", "--output", out)
    assert refused(r, out) and "copa_local" not in r.stdout and out.read_text() == "mine"   # before evaluating
    forced = evaluate(ckpt, shared_data, "--tasks", "copa_local", "--output", out, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads(out.read_text())["n-samples"]["copa_local"]["effective"] == 4


def test_evaluate_refuses_a_directory_as_output_even_with_force(tmp_path, ckpt, shared_data):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "fout"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for extra in ((), ("--force",)):
        r = evaluate(ckpt, shared_data, "--tasks", "copa_local", "--output", folder, *extra)
        assert one_error(r, f"--output {folder}: is a directory, not a file") and "copa_local" not in r.stdout
        assert sorted(os.listdir(folder)) == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"


def test_lambada_text_that_is_not_text_is_one_line(tmp_path, ckpt, shared_data):
    pytest.importorskip("lm_eval")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"context": "a b", "target": " c"}\n' + bytes(range(128, 256)))   # as if /bin/ls
    r = evaluate(ckpt, shared_data, "--tasks", "lambada_local", "--lambada-text", binary)
    assert one_error(r, f"{binary}:2: not UTF-8 (byte 0x80")


def test_read_lambada_names_file_and_line(tmp_path):
    from megagpt.errors import MegaGPTError
    from megagpt.eval.lambada import read_lambada, write_lambada

    good = '{"context": "a b", "target": " c"}\n'
    for name, body, where in (("bin.txt", b"words\n\xff\xfe", "bin.txt:2: not UTF-8"),
                              ("bad.jsonl", (good + '{"context": "a",\n').encode(), "bad.jsonl:2: expected a JSON"),
                              ("text.jsonl", (good * 2 + '{"text": "a corpus"}\n').encode(), "text.jsonl:3: expected")):
        (tmp_path / name).write_bytes(body)
        with pytest.raises(MegaGPTError, match=where):
            read_lambada(tmp_path / name)
    with pytest.raises(MegaGPTError, match="bin.txt:2: not UTF-8"):
        write_lambada(tmp_path / "bin.txt", tmp_path / "out.jsonl")


def test_lambada_builder_refuses_an_existing_output(tmp_path, shakespeare_txt):
    out, folder = tmp_path / "passages.jsonl", tmp_path / "folder"
    out.write_text("mine")
    folder.mkdir()
    build = ("-m", "megagpt.eval.lambada", shakespeare_txt)
    assert refused(cli(*build, out), out) and out.read_text() == "mine"
    assert one_error(cli(*build, folder, "--force"), f"{folder}: is a directory, not a file") and folder.is_dir()
    forced = cli(*build, out, "--force")
    assert forced.returncode == 0 and len(out.read_text().splitlines()) > 100, forced.stderr
