"""megagpt.atomic: published files and directories get normal permissions, failures and kills
leave the old target untouched, and nothing but (at most, after a kill) a hidden temp entry."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megagpt import atomic
from megagpt.atomic import AtomicFile, atomic_dir, atomic_file, write_bytes_atomic, write_text_atomic
from megagpt.errors import MegaGPTError


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def entries(d) -> list[str]:
    return sorted(os.listdir(d))


def test_published_file_is_world_readable_under_umask_022(tmp_path, umask022):
    p = write_text_atomic(tmp_path / "hostfile", "node01 slots=8\n")
    assert p.read_text() == "node01 slots=8\n" and mode(p) == 0o644
    with atomic_file(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01")
    assert mode(tmp_path / "a.bin") == 0o644
    assert entries(tmp_path) == ["a.bin", "hostfile"]


def test_published_dir_and_its_files_are_world_readable_under_umask_022(tmp_path, umask022):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.tmp-")
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        (tmp / "tokenizer").mkdir()
        write_text_atomic(tmp / "tokenizer" / "config.json", "{}")
        from safetensors.torch import save_file   # a third-party writer that makes 0o600 files
        import torch
        save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))
        os.chmod(tmp / "tokenizer", 0o700)
    assert mode(out / "weights.safetensors") == 0o644
    assert mode(out) == 0o755 and mode(out / "tokenizer") == 0o755
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "tokenizer" / "config.json") == 0o644
    assert entries(tmp_path) == ["export"]


def test_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        p = write_bytes_atomic(tmp_path / "secret", b"k")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_bytes(b"")
    finally:
        os.umask(old)
    assert mode(p) == 0o600 and mode(tmp_path / "d") == 0o700


def test_failure_inside_a_file_block_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "latest"
    p.write_text("global_step4")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(p) as f:
            f.write(b"global_step8")
            raise RuntimeError("disk full")
    assert p.read_text() == "global_step4" and entries(tmp_path) == ["latest"]


def test_failure_inside_a_dir_block_leaves_the_old_dir_and_no_temp(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise KeyboardInterrupt
    assert (out / "config.json").read_text() == "old" and entries(tmp_path) == ["hf"]


def test_replacing_a_dir_leaves_no_old_copy(tmp_path):
    out = tmp_path / "best"
    for text in ("v1", "v2"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "w").write_text(text)
    assert (out / "w").read_text() == "v2" and entries(tmp_path) == ["best"]
    (tmp_path / "file_target").write_text("a file")  # force also replaces a file by a directory
    with atomic_dir(tmp_path / "file_target", force=True) as tmp:
        (tmp / "x").write_text("dir now")
    assert (tmp_path / "file_target" / "x").read_text() == "dir now"
    assert entries(tmp_path) == ["best", "file_target"]


def test_failed_final_rename_puts_the_old_dir_back(tmp_path, monkeypatch):
    """The second of the two renames (new tree into place) fails: the old tree is restored under
    its name and neither the temp nor the moved-aside copy remains."""
    out = tmp_path / "best"
    out.mkdir()
    (out / "w").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".best.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "w").write_text("new")
    assert (out / "w").read_text() == "old" and entries(tmp_path) == ["best"]


def test_existing_target_without_force_is_refused_before_any_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "f").write_text("keep")
    with pytest.raises(MegaGPTError, match="already exists; pass --force"):
        with atomic_dir(tmp_path / "out"):
            pytest.fail("the block must not run")
    with pytest.raises(MegaGPTError, match="already exists"):
        write_text_atomic(tmp_path / "f", "new", force=False)
    assert (tmp_path / "f").read_text() == "keep" and entries(tmp_path) == ["f", "out"]


def test_no_clobber_publish_loses_a_race_cleanly(tmp_path):
    """force=False checks again at publish time: a target created meanwhile is not replaced."""
    af = AtomicFile(tmp_path / "f", force=False)
    af.file.write(b"mine")
    (tmp_path / "f").write_text("theirs")
    with pytest.raises(MegaGPTError, match="already exists"):
        af.commit()
    assert (tmp_path / "f").read_text() == "theirs" and entries(tmp_path) == ["f"]


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from megagpt.atomic import atomic_dir, atomic_file

    target, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "file":
        with atomic_file(target) as f:
            f.write(b"new " * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    else:
        with atomic_dir(target, force=True) as tmp:
            (tmp / "w").write_text("new")
            print("writing", flush=True)
            time.sleep(60)
""")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_killed_writer_leaves_the_old_content(tmp_path, kind):
    """SIGKILL mid-write (no handler, no finally runs): the target still holds the old content
    and the only other entry is the hidden temp."""
    target = tmp_path / "out"
    if kind == "file":
        target.write_bytes(b"old")
    else:
        target.mkdir()
        (target / "w").write_text("old")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(target), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()
    if kind == "file":
        assert target.read_bytes() == b"old"
    else:
        assert (target / "w").read_text() == "old" and entries(target) == ["w"]
    others = [e for e in entries(tmp_path) if e != "out"]
    assert len(others) == 1 and others[0].startswith(".out.tmp-"), others


def test_shard_writer_publishes_through_the_helper(tmp_path, umask022):
    """IndexedDatasetWriter: .bin/.idx appear with normal permissions on success; an exception
    leaves no file at all."""
    from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        w.add_document([5, 6, 7])
    assert entries(tmp_path) == ["s.bin", "s.idx"] and {mode(tmp_path / e) for e in entries(tmp_path)} == {0o644}
    assert IndexedDataset(tmp_path / "s")[0].tolist() == [5, 6, 7]
    with pytest.raises(ValueError):
        with IndexedDatasetWriter(tmp_path / "t", np.uint16) as w:
            w.add_document([1])
            raise ValueError("stop")
    assert entries(tmp_path) == ["s.bin", "s.idx"]


def test_a_directory_that_cannot_be_created_is_one_error_naming_it(tmp_path):
    """A file where a parent folder should be (or a read-only parent): MegaGPTError naming the
    output, not the mkdir's FileExistsError traceback (tools/convert_checkpoint.py --output)."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "export"
    with pytest.raises(MegaGPTError, match=r"afile/export: cannot write: File exists"):
        with atomic_dir(out):
            pass
    assert (tmp_path / "afile").read_text() == "x"
