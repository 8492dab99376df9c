"""On-disk cache of index arrays: naming by content hash, atomic writes, rank 0 builds first.

Index arrays (document order, sample boundaries, shuffles, blend order) are cheap to load and
expensive to build, and every data-parallel rank must see the *same* arrays: rank 0 builds them
under a name hashing all they depend on, the others wait and then memory-map the same files.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from megagpt.atomic import atomic_file, write_text_atomic
from megagpt.data import indexed
from megagpt.errors import MegaGPTError


def shard_fingerprint(prefix) -> dict:
    """Identity of a shard's content: sha256 of the ``.idx`` (sizes + doc boundaries) and the
    ``.bin`` byte size. Unlike mtimes it is the same on every node and survives copies."""
    h = hashlib.sha256()
    with open(indexed.idx_path(prefix), "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"idx_sha256": h.hexdigest(), "bin_bytes": os.path.getsize(indexed.bin_path(prefix))}


def describe_hash(desc: dict) -> str:
    """Short stable hash of a JSON-able description (keys sorted)."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".megagpt-write-test-"):
            return True
    except OSError:
        return False


def resolve_cache_dir(prefix, cache_dir=None) -> Path:
    """``cache_dir`` if given (must be writable), else ``index-cache/`` beside the shard, else a per-user
    cache (``$XDG_CACHE_HOME/megagpt/index-cache``) when the data lives on a read-only mount."""
    if cache_dir is not None:
        d = Path(cache_dir)
        if not _writable(d):
            raise MegaGPTError(f"data config: cache_dir={str(cache_dir)!r} is not a writable directory")
        return d
    d = Path(os.path.abspath(prefix)).parent / "index-cache"
    if os.access(d.parent, os.W_OK) and _writable(d):
        return d
    d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megagpt" / "index-cache"
    if not _writable(d):
        raise MegaGPTError(f"{prefix}: neither the shard's directory nor {d} is writable for index "
                           f"caches; set cache_dir in the data config")
    return d


def load_npy(path: Path) -> np.ndarray:
    """Memory-mapped (nothing read until used), as a plain ndarray view: indexing an
    ``np.memmap`` subclass costs microseconds per scalar, which dominates ``__getitem__``."""
    return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)


def cached_arrays(stem, names, desc: dict, make, check=None) -> tuple[dict, bool]:
    """Paths ``{name: Path(f"{stem}_{name}.npy")}`` of index arrays and whether this process built
    them: unless they all exist, ``make()`` returns them by name and ``{stem}_desc.json`` records
    ``desc``. ``check()`` runs first either way. Rank 0 goes first (``rank0_first``)."""
    paths, built = {k: Path(f"{stem}_{k}.npy") for k in names}, []

    def build():
        if check is not None:
            check()
        if not all(p.exists() for p in paths.values()):
            for k, arr in make().items():
                with atomic_file(paths[k]) as f:
                    np.save(f, arr, allow_pickle=False)
            write_text_atomic(Path(f"{stem}_desc.json"), json.dumps(desc, indent=1))
            built.append(True)

    rank0_first(build)
    return paths, bool(built)


def rank0_first(build):
    """``build()`` on rank 0 while the other ranks wait, then on them: with a shared cache
    directory they find rank 0's files and do nothing, with node-local ones each node builds its
    own (identical) copy. The wait is a broadcast, not a bare barrier, so that a ``MegaGPTError``
    on rank 0 (say, a bad token id) is re-raised on every rank instead of leaving them hung.
    A collective: every rank of the default group must get here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    err, exc = [None], None
    if dist.get_rank() == 0:
        try:
            build()
        except Exception as e:  # tell the other ranks, then re-raise the original here
            exc = e
            err = [str(e) if isinstance(e, MegaGPTError) else f"rank 0 failed: {type(e).__name__}: {e}"]
    dist.broadcast_object_list(err, src=0)
    if exc is not None:
        raise exc
    if err[0] is not None:
        raise MegaGPTError(err[0])
    if dist.get_rank() != 0:
        build()
