"""Write a whole directory or file so readers only ever see the old version or the complete new one.

Checkpoints, exports and shards all follow the same rule: build under a temporary sibling name,
then rename into place. A crash leaves at most a dot-prefixed temp entry, never a half-written
directory under the real name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from megagpt.errors import MegaGPTError


@contextlib.contextmanager
def atomic_dir(out, force: bool = False):
    """Yield a temp dir beside ``out``; on success it replaces ``out`` (``force`` to overwrite)."""
    out = Path(out)
    if out.exists() and not force:
        raise MegaGPTError(f"{out}: already exists; pass --force to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():  # os.replace cannot replace a non-empty dir: move the old one aside first
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
