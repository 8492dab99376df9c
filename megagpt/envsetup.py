"""What DeepSpeed caches per machine, kept per environment: every entry that may start DeepSpeed calls
``prepare_deepspeed()`` first (the launch CLI sets the ops directory before it execs trainers).

JIT-built ops: torch's own cache of the extensions it builds (``~/.cache/torch_extensions/py311_cpu/``)
is keyed by the Python version only: two environments on one machine rebuild each other's ops (30-90 s
each) as they alternate, and a torch upgrade can load a stale build. Here the key is ``sys.prefix`` and the torch version (``scripts/setup_env.sh`` pre-builds
into it); an explicit ``TORCH_EXTENSIONS_DIR`` wins.

The CPU's description: DeepSpeed's CPU op builders (and its CPU Adam) ask py-cpuinfo two or three
times per rank, and every ask starts a fresh Python (~1.2 s each, ~2.3 s of every CPU rank's start).
The answer is a property of the CPU, so it is kept beside the ops built with it, one file per CPU
model and flag set (a cluster of mixed nodes sharing a home keeps one each).
Imports nothing heavy: runs before torch loads.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
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


def cpu_info_path(proc_cpuinfo: str = "/proc/cpuinfo") -> Path | None:
    """``cpuinfo-<hash of the CPU's vendor, model and flags>.json`` in the ops directory; None where
    the CPU cannot be identified without asking py-cpuinfo (no ``/proc/cpuinfo``)."""
    try:
        lines = Path(proc_cpuinfo).read_text().splitlines()
    except OSError:
        return None
    keys = ("vendor_id", "model name", "cpu family", "model", "flags", "CPU implementer", "CPU part", "Features")
    ident = sorted({line.split(":")[0].strip() + ":" + line.split(":", 1)[-1].strip() for line in lines
                    if line.split(":")[0].strip() in keys})
    if not ident:
        return None
    key = hashlib.sha256("\n".join([platform.machine(), *ident]).encode()).hexdigest()[:16]
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch_extensions_dir()) / f"cpuinfo-{key}.json"


def cache_cpu_info() -> None:
    """``cpuinfo.get_cpu_info`` answers from the file of this CPU (written on the first ask), and from
    memory after that; a copy each call, as py-cpuinfo gives. Without py-cpuinfo: nothing to do."""
    try:
        import cpuinfo
    except ImportError:
        return
    if getattr(cpuinfo.get_cpu_info, "cached_by_megagpt", False):
        return
    ask, path, memo = cpuinfo.get_cpu_info, cpu_info_path(), []

    def get_cpu_info():
        if not memo:
            try:
                memo.append(json.loads(path.read_text()))
            except (AttributeError, OSError, ValueError):   # no path, no file yet, a torn one
                memo.append(ask())
                if path is not None:
                    from megagpt.atomic import write_text_atomic
                    try:
                        write_text_atomic(path, json.dumps(memo[0]))
                    except OSError:   # a read-only cache: ask again next time
                        pass
        return json.loads(json.dumps(memo[0]))

    get_cpu_info.cached_by_megagpt = True
    cpuinfo.get_cpu_info = get_cpu_info


def prepare_deepspeed() -> str:
    """Both caches, before DeepSpeed loads; returns the ops directory in effect."""
    ops = set_torch_extensions_dir()
    cache_cpu_info()
    return ops


if __name__ == "__main__":
    print(torch_extensions_dir())
