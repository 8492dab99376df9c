"""Per-environment cache of JIT-built ops: every entry that may start DeepSpeed calls
``set_torch_extensions_dir()`` first.

torch builds C++/CUDA extensions on first use (DeepSpeed's shm comm, CPU Adam, fused Adam;
``megagpt_kernels.cuda``) and caches them in ``~/.cache/torch_extensions/py311_cpu/``, a name
keyed by the Python version only. Two environments on one machine (two venvs, two torch builds)
then share that directory and rebuild each other's ops, 30-90 s each, every time they alternate;
a torch upgrade can even load a stale build. The directory here is keyed by the environment
(``sys.prefix``) and the torch version instead, and ``scripts/setup_env.sh`` pre-builds the ops
into the same place (it runs this file to get the name).

Every entry point calls it before DeepSpeed loads (the launch CLI before it execs trainers). An
explicit ``TORCH_EXTENSIONS_DIR`` always wins.

Imports nothing heavy (no torch): it must run before torch loads, and as a plain script.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path


def torch_extensions_dir() -> str:
    """``$XDG_CACHE_HOME/torch_extensions/py311-torch2.13.0+cpu-<hash of sys.prefix>``."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    env = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    return str(base / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}-{env}")


def set_torch_extensions_dir() -> str:
    """Default ``TORCH_EXTENSIONS_DIR`` to this environment's directory; returns the one in effect.
    Child processes (DeepSpeed's launcher, its ranks) inherit it."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


if __name__ == "__main__":
    print(torch_extensions_dir())
