"""Per-environment cache of JIT-built ops: every entry that may start DeepSpeed (the launch CLI before
it execs trainers) calls ``set_torch_extensions_dir()`` first. torch's own cache of the extensions it
builds (``~/.cache/torch_extensions/py311_cpu/``) is keyed by the Python version only: two environments
on one machine rebuild each other's ops (30-90 s each) as they alternate, and a torch upgrade can load
a stale build. Here the key is ``sys.prefix`` and the torch version (``scripts/setup_env.sh`` pre-builds
into it); an explicit ``TORCH_EXTENSIONS_DIR`` wins. Imports nothing heavy: runs before torch loads.
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
    """Default ``TORCH_EXTENSIONS_DIR`` (inherited by the launcher's ranks); returns the one in effect."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


if __name__ == "__main__":
    print(torch_extensions_dir())
