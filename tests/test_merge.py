"""tools/merge_datasets.py: concatenated shards keep doc_idx right and are read by megatron-core."""
import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.data.preprocess import preprocess
from megagpt.errors import MegaGPTError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "merge_datasets.py"


@pytest.fixture(scope="module")
def merge_tool():
    spec = importlib.util.spec_from_file_location("merge_datasets_tool", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merging_shards_reproduces_the_unsharded_output(tmp_path, merge_tool, shakespeare_txt, sp_model):
    lines = shakespeare_txt.read_text(encoding="utf-8").split("\n\n")[:800]
    (tmp_path / "in.txt").write_text("\n\n".join(lines), encoding="utf-8")
    one = preprocess([str(tmp_path / "in.txt")], str(tmp_path / "one"), sp_model, split_paragraphs=True)
    many = preprocess([str(tmp_path / "in.txt")], str(tmp_path / "shards" / "many"), sp_model,
                      split_paragraphs=True, shard_size_tokens=4000)
    assert len(many.output_prefixes) >= 3
    merge_tool.main(["--input", str(tmp_path / "shards"), "--pattern", "many_text_document_*",
                     "--output-prefix", str(tmp_path / "merged")])
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(f"{one.output_prefixes[0]}{ext}", f"{tmp_path}/merged{ext}", shallow=False)


def test_doc_idx_offsets_and_megatron_core(tmp_path, merge_tool, shakespeare_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    # a shard whose documents hold several sequences: doc_idx is not simply 0..N
    multi = str(tmp_path / "multi")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (3, 5, 1, 7, 2, 4)]
    with IndexedDatasetWriter(multi, np.uint16) as w:
        for group in ([0, 1], [2], [3, 4, 5]):
            for i in group:
                w.add_item(seqs[i])
            w.end_document()
    base = IndexedDataset(shakespeare_prefix)
    merged = merge_tool.merge_datasets([multi, shakespeare_prefix, multi], str(tmp_path / "m"))
    n = len(base)
    assert merged.doc_idx.tolist() == [0, 2, 3, 6] + [6 + d for d in base.doc_idx[1:].tolist()] + [
        6 + n + 2, 6 + n + 3, 6 + n + 6]
    mg = MegatronIndexedDataset(str(tmp_path / "m"))
    assert len(mg) == 12 + n and mg.document_indices.tolist() == merged.doc_idx.tolist()
    assert mg.sequence_lengths.tolist() == [len(s) for s in seqs] + base.sizes.tolist() + [len(s) for s in seqs]
    for i in (0, 3, 5):
        assert mg[i].tolist() == seqs[i].tolist() == mg[6 + n + i].tolist()
    for i in (0, 1, n // 2, n - 1):
        assert mg[6 + i].tolist() == base[i].tolist()


def test_refusals_are_clear_and_leave_nothing(tmp_path, merge_tool, shakespeare_prefix):
    wide = str(tmp_path / "wide")
    with IndexedDatasetWriter(wide, np.int32) as w:
        w.add_document([70000, 1, 2])
    with pytest.raises(MegaGPTError, match=r"wide: token dtype int32 differs from uint16 of .*shakespeare"):
        merge_tool.merge_datasets([shakespeare_prefix, wide], str(tmp_path / "out"))
    with pytest.raises(MegaGPTError, match=r"absent\.idx: no such file"):
        merge_tool.merge_datasets([shakespeare_prefix, str(tmp_path / "absent")], str(tmp_path / "out"))
    with pytest.raises(MegaGPTError, match="also an input"):
        merge_tool.merge_datasets([wide], wide)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.bin", "wide.idx"]
    with pytest.raises(MegaGPTError, match=r"no \*\.idx shards matching 'x\*'"):
        merge_tool.find_prefixes([str(tmp_path)], "x*")


def test_a_shard_given_twice_is_refused_before_any_output(tmp_path, merge_tool, monkeypatch, capsys):
    """``--input X X`` merged every document twice; spellings of one shard count as the same."""
    monkeypatch.chdir(tmp_path)
    with IndexedDatasetWriter("data/c_text_document", np.uint16) as w:
        w.add_document([1, 2, 3])
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for inputs, named in ((["data/c_text_document", "data/c_text_document"], "data/c_text_document"),
                          (["data/c_text_document", "./data/c_text_document"], "./data/c_text_document"),
                          (["data/c_text_document.idx", "link/c_text_document.bin"], "link/c_text_document"),
                          (["data/c_text_document", "data"], "data/c_text_document")):
        with pytest.raises(SystemExit) as e:
            merge_tool.main(["--input", *inputs, "--output-prefix", "m/twice"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == [f"error: --input {named} is given twice"], (inputs, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]


def test_cli(tmp_path, shakespeare_prefix):
    h = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--input" in h.stdout and "--output-prefix" in h.stdout and "--pattern" in h.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--input", shakespeare_prefix, str(tmp_path / "gone"),
                          "--output-prefix", str(tmp_path / "out")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: ") and "gone.idx: no such file" in bad.stderr
    assert list(tmp_path.iterdir()) == []
