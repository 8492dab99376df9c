"""The data tools never overwrite a user's file without --force: train_tokenizer, preprocess_data
and merge_datasets refuse an existing output with one line naming it (exit 2, before any work,
the file untouched); with --force they replace it, and preprocess_data removes the stale numbered
shards of an earlier, longer run so they cannot be read as part of the new one."""
import os
import shutil
import subprocess
import sys

from test_train_runs import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tool(name, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def refused(r, path):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [f"error: {path}: already exists; pass --force to overwrite"], r.stderr
    return True


def test_train_tokenizer_refuses_then_forces(tmp_path, shakespeare_txt):
    out = tmp_path / "tok"
    first = tool("train_tokenizer.py", "--input", shakespeare_txt, "--vocab-size", 400, "--output-prefix", out)
    assert first.returncode == 0, first.stderr
    (out.parent / "tok.model").write_bytes(b"mine")        # the user's file, whatever it holds
    assert refused(tool("train_tokenizer.py", "--input", shakespeare_txt, "--vocab-size", 300,
                        "--output-prefix", out), f"{out}.model")
    assert (out.parent / "tok.model").read_bytes() == b"mine"
    again = tool("train_tokenizer.py", "--input", shakespeare_txt, "--vocab-size", 400, "--output-prefix", out,
                 "--force")
    assert again.returncode == 0, again.stderr
    from megagpt.tokenizer import load_tokenizer

    assert load_tokenizer(str(out.parent / "tok.model")).vocab_size == 400   # replaced by a real one


def test_preprocess_refuses_then_forces_and_drops_stale_shards(tmp_path, shakespeare_txt, sp_model):
    prefix = tmp_path / "shk"
    args = ["--input", shakespeare_txt, "--tokenizer-model", sp_model, "--output-prefix", prefix,
            "--split-paragraphs", "--workers", 1]
    assert tool("preprocess_data.py", *args, "--shard-size-tokens", 50_000).returncode == 0
    shards = sorted(p.name for p in tmp_path.glob("shk_text_document_*.bin"))
    assert len(shards) > 2
    first = tmp_path / "shk_text_document_00000.bin"
    old = first.read_bytes()
    assert refused(tool("preprocess_data.py", *args), first)   # any shard at this prefix, numbered or not
    assert refused(tool("preprocess_data.py", *args, "--shard-size-tokens", 50_000), first)
    assert first.read_bytes() == old
    forced = tool("preprocess_data.py", *args, "--shard-size-tokens", 150_000, "--force")
    assert forced.returncode == 0, forced.stderr
    left = sorted(p.name for p in tmp_path.glob("shk_text_document_*"))
    n = len([x for x in left if x.endswith(".bin")])
    assert 0 < n < len(shards) and len(left) == 3 * n     # .bin, .idx, .meta.json; nothing of the first run
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_merge_refuses_then_forces(tmp_path, shakespeare_prefix):
    out, twin = tmp_path / "merged", tmp_path / "twin"
    for ext in (".bin", ".idx", ".meta.json"):   # the same shard under another prefix (one prefix twice is refused)
        shutil.copyfile(shakespeare_prefix + ext, f"{twin}{ext}")
    assert tool("merge_datasets.py", "--input", shakespeare_prefix, twin, "--output-prefix", out).returncode == 0
    size = (tmp_path / "merged.bin").stat().st_size
    assert refused(tool("merge_datasets.py", "--input", shakespeare_prefix, "--output-prefix", out),
                   f"{out}.bin")
    assert (tmp_path / "merged.bin").stat().st_size == size
    r = tool("merge_datasets.py", "--input", shakespeare_prefix, "--output-prefix", out, "--force")
    assert r.returncode == 0 and (tmp_path / "merged.bin").stat().st_size * 2 == size
