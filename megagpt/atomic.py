"""Publish files and directories so readers only ever see the old version or the complete new one.

Every output is built under a hidden temporary sibling (``.NAME.tmp-PID-RANDOM``), fsynced, then renamed
into place and the parent directory fsynced: a crash or kill -9 leaves at most a dot-prefixed temp entry,
an exception not even that. Temp entries get the modes a plain ``open()``/``mkdir`` would (0o666 / 0o777
less the umask): ``tempfile``'s 0o600 / 0o700 would survive the rename, unreadable to a shared cluster.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from megagpt.errors import MegaGPTError


def temp_sibling(path, kind: str = "tmp") -> Path:
    """``DIR/.NAME.<kind>-PID-RANDOM``: same directory (so the rename is atomic), hidden, unique."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync(path) -> None:
    """fsync a file, or a directory (which makes a rename or create inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_modes(root) -> None:
    """Every entry under ``root`` gets a plain ``open()``/``mkdir`` mode (safetensors, sentencepiece make 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~mask)


def fsync_tree(root) -> None:
    """fsync every file and directory under ``root`` (before renaming the tree into place)."""
    for d, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(d, name))
        _fsync(d)


def _exists_error(path) -> MegaGPTError:
    return MegaGPTError(f"{path}: already exists; pass --force to overwrite")


def refuse_existing(paths) -> None:
    """The CLIs never overwrite without ``--force``: one line naming the first of ``paths`` that exists."""
    for p in paths:
        if os.path.lexists(p):
            raise _exists_error(p)


def check_output_file(path, force: bool, flag: str | None = None) -> None:
    """Before the work: an existing file is replaced only with ``--force``, a directory never (found at
    the write, either would cost the whole run)."""
    if os.path.isdir(path):
        raise MegaGPTError("is a directory, not a file", file=str(path), flag=flag and f"{flag} {path}")
    if not force:
        refuse_existing([path])


@contextlib.contextmanager
def writing(path):
    """An OSError in the block (read-only or full disk, a file where a folder should be) becomes
    one line naming the output ``path``, and the file it failed on unless that is a hidden temp."""
    try:
        yield
    except OSError as e:
        failed = str(e.filename or "")
        where = f" ({failed})" if failed and not os.path.basename(failed).startswith(".") else ""
        raise MegaGPTError(f"{path}: cannot write: {e.strerror or e}{where}") from None


def publish(src, dst, force: bool = True) -> None:
    """Rename the durable ``src`` to ``dst`` (same filesystem) and fsync ``dst``'s directory.
    ``force=False`` refuses an existing ``dst``, race-free for files (a hard link fails if the name exists)."""
    src, dst = Path(src), Path(dst)
    if force:
        os.replace(src, dst)
    elif src.is_dir():
        refuse_existing([dst])
        os.rename(src, dst)  # an existing empty dir would be replaced; checked just above
    else:
        try:
            os.link(src, dst)
        except FileExistsError:
            raise _exists_error(dst) from None
        os.unlink(src)
    _fsync(dst.parent)


class AtomicFile:
    """A binary file written under a temp sibling of ``path``; ``commit()`` publishes it, ``discard()``
    removes it. ``with atomic_file(p) as f: f.write(b"...")``: ``p`` changes only if the block succeeds."""

    def __init__(self, path, force: bool = True):
        self.path, self.force = Path(path), force
        if not force:
            refuse_existing([self.path])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_sibling(self.path)
        self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), "wb")

    def commit(self) -> Path:
        """flush + fsync + close, then rename into place; on failure the temp file is removed."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            publish(self.tmp, self.path, self.force)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


atomic_file = AtomicFile


def write_bytes_atomic(path, data: bytes, force: bool = True) -> Path:
    with atomic_file(path, force) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path, text: str, force: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), force)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


@contextlib.contextmanager
def atomic_dir(out, force: bool = False):
    """Yield a hidden temp dir beside ``out``; if the block succeeds its tree is fsynced and replaces ``out``
    (an existing one only with ``force``: two renames, the old one put back if the second fails), else
    it is removed."""
    out = Path(out)
    if not force:
        refuse_existing([out])
    with writing(out):   # a read-only parent, or a file where a folder should be: one line
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out)
        os.mkdir(tmp, 0o777)  # mode filtered by the umask, as for any new directory
    try:
        yield tmp
        _umask_modes(tmp)
        fsync_tree(tmp)
        if not force or not os.path.lexists(out):
            publish(tmp, out, force=False)   # refuses an ``out`` made meanwhile
            return
        old = temp_sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _fsync(out.parent)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise
