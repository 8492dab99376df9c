"""Weighted blend of several datasets in a fixed, deterministic interleaving.

Megatron's greedy "largest error first" rule: before drawing sample k, every dataset's error is
``weight * max(k, 1) - drawn_so_far`` and the dataset furthest behind (lowest index on ties) gives
the next sample. Any prefix of the stream then matches the weights to within about one sample
per dataset, which a random draw cannot promise. The result equals megatron-core's
``build_blending_indices`` bit for bit (the tests check this), so blends are comparable. The loop
runs in a small C kernel compiled on first use (100M samples in about a second) so that rank 0
does not keep the others waiting; without a C compiler it runs in Python, ~100x slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from megagpt.data import index_cache
from megagpt.errors import MegaGPTError

CLASS_VERSION = 1


_KERNEL_SRC = r"""
#include <stdint.h>
/* The greedy rule of blending_indices, step for step: float64, no FMA (-ffp-contract=off), strict
   '>' so the lowest index wins ties. Counts are kept as doubles (exact below 2^53), which is the
   (double)count the rule subtracts. For 2..8 datasets a fixed-size copy that the compiler keeps in
   registers and selects without branches (~5x faster at 3 datasets than the plain loop below). */
#define BLEND_FIXED(ND)                                                                        \
static void blend_##ND(const double *wp, int64_t n, int32_t *idx, int64_t *sample) {           \
    double w[ND], c[ND];                                                                       \
    for (int d = 0; d < ND; ++d) { w[d] = wp[d]; c[d] = 0.0; }                                 \
    for (int64_t k = 0; k < n; ++k) {                                                          \
        double scale = k > 0 ? (double)k : 1.0;                                                \
        int b = 0;                                                                             \
        double best = w[0] * scale - c[0];                                                     \
        for (int d = 1; d < ND; ++d) {                                                         \
            double e = w[d] * scale - c[d];                                                    \
            int gt = e > best;                                                                 \
            b = gt ? d : b;                                                                    \
            best = gt ? e : best;                                                              \
        }                                                                                      \
        double cb = c[0];                                                                      \
        for (int d = 1; d < ND; ++d) cb = d == b ? c[d] : cb;                                  \
        idx[k] = b;                                                                            \
        sample[k] = (int64_t)cb;                                                               \
        for (int d = 0; d < ND; ++d) c[d] += (double)(d == b);                                 \
    }                                                                                          \
}
BLEND_FIXED(2) BLEND_FIXED(3) BLEND_FIXED(4) BLEND_FIXED(5) BLEND_FIXED(6) BLEND_FIXED(7) BLEND_FIXED(8)

void megagpt_blend(const double *w, int32_t nd, int64_t n, int32_t *idx, int64_t *sample,
                   int64_t *counts) {
    switch (nd) {
    case 2: blend_2(w, n, idx, sample); return;
    case 3: blend_3(w, n, idx, sample); return;
    case 4: blend_4(w, n, idx, sample); return;
    case 5: blend_5(w, n, idx, sample); return;
    case 6: blend_6(w, n, idx, sample); return;
    case 7: blend_7(w, n, idx, sample); return;
    case 8: blend_8(w, n, idx, sample); return;
    }
    for (int64_t k = 0; k < n; ++k) {
        double scale = k > 0 ? (double)k : 1.0;
        int32_t best = 0;
        double best_err = w[0] * scale - (double)counts[0];
        for (int32_t d = 1; d < nd; ++d) {
            double err = w[d] * scale - (double)counts[d];
            if (err > best_err) { best = d; best_err = err; }
        }
        idx[k] = best;
        sample[k] = counts[best]++;
    }
}
"""
_CFLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
_kernel = None  # the loaded C function, False once building it failed


def _cache_dir() -> Path:
    """Where compiled kernels live: $MEGAGPT_CACHE (as for train.metrics' peak-FLOPs cache), else
    $XDG_CACHE_HOME/megagpt or ~/.cache/megagpt."""
    root = os.environ.get("MEGAGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "megagpt")
    return Path(root)


def _load_kernel():
    """The C loop as a ctypes function, compiled on first use with the system C compiler (the one
    DeepSpeed's CPU ops need anyway) into a cache keyed by source and flags; None if no compiler.
    Written under a temporary name and renamed, so ranks compiling at once never load half a file."""
    global _kernel
    if _kernel is not None:
        return _kernel or None
    try:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        key = hashlib.sha256((_KERNEL_SRC + " ".join(_CFLAGS) + cc + platform.machine()).encode()).hexdigest()[:16]
        so = _cache_dir() / f"blend_{key}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                src, out = Path(tmp) / "blend.c", Path(tmp) / "blend.so"
                src.write_text(_KERNEL_SRC)
                subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, so)
        fn = ctypes.CDLL(str(so)).megagpt_blend
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p]
        _kernel = fn
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.stderr.decode(errors="replace").strip() if getattr(e, "stderr", None) else str(e)
        warnings.warn(f"blend: could not build the C blend kernel ({detail.splitlines()[0] if detail else e}); "
                      f"using the Python loop (about 1 s per million samples)")
        _kernel = False
    return _kernel or None


def blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index): sample k is ``datasets[dataset_index[k]][dataset_sample_index[k]]``.
    Each choice depends on all earlier ones, so this is a sequential loop: in C (about 0.3-1 s per
    100M samples for 3 datasets), compiled on first use; the Python loop if that is impossible."""
    w = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
    n = int(num_samples)
    kernel = _load_kernel() if n > 0 and len(w) > 0 else None
    if kernel is None:
        return blending_indices_python(w.tolist(), n)
    ds_index = np.empty(n, dtype=np.int32)
    ds_sample = np.empty(n, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    kernel(w.ctypes.data, len(w), n, ds_index.ctypes.data, ds_sample.ctypes.data, counts.ctypes.data)
    return ds_index, ds_sample


def blending_indices_python(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The same greedy loop in Python (about 1 s per million samples): the fallback, and the
    readable statement of the rule the C kernel implements."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    ds_index = np.empty(num_samples, dtype=np.int32)
    ds_sample = np.empty(num_samples, dtype=np.int64)
    ds_range = range(len(w))
    for k in range(num_samples):
        scale = float(max(k, 1))
        best, best_err = 0, w[0] * scale - counts[0]
        for d in ds_range:
            err = w[d] * scale - counts[d]
            if err > best_err:
                best, best_err = d, err
        ds_index[k] = best
        ds_sample[k] = counts[best]
        counts[best] += 1
    return ds_index, ds_sample


def max_draws(weight: float, num_samples: int) -> int:
    """Upper bound on samples the greedy rule takes from a dataset of normalised ``weight``
    (it only draws from a dataset that is not ahead, so count <= weight * (n - 1) + 1)."""
    return min(num_samples, int(math.floor(weight * num_samples)) + 2)


def normalise_weights(weights) -> list[float]:
    ws = [float(w) for w in weights]
    if not ws or any(not math.isfinite(w) or w <= 0 for w in ws):
        raise MegaGPTError(f"blend weights {list(weights)!r} must be positive numbers")
    total = sum(ws)
    return [w / total for w in ws]


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from ``datasets`` in proportion to ``weights``, the index
    arrays cached like ``GPTDataset``'s in ``cache_dir`` (default: the first child's, if any).
    ``seed`` only keys the cache: each child already shuffles its own samples."""

    def __init__(self, datasets, weights, num_samples: int, seed: int, cache_dir=None):
        self.datasets = list(datasets)
        if len(self.datasets) != len(weights) or not self.datasets:
            raise MegaGPTError(f"blend: {len(self.datasets)} datasets but {len(weights)} weights")
        if num_samples < 1:
            raise MegaGPTError(f"blend: num_samples={num_samples} must be >= 1")
        self.weights = normalise_weights(weights)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.built_index, self.paths = False, None
        cache_dir = getattr(self.datasets[0], "cache_dir", None) if cache_dir is None else cache_dir
        keys = [getattr(d, "cache_hash", None) for d in self.datasets]
        if cache_dir is None or None in keys:
            self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.num_samples)
        else:
            desc = {"class": "BlendedDataset", "version": CLASS_VERSION, "children": keys,
                    "weights": self.weights, "num_samples": self.num_samples, "seed": self.seed}
            stem = Path(cache_dir) / f"blend_{index_cache.describe_hash(desc)}"
            names = ("dataset_index", "dataset_sample_index")
            self.paths, self.built_index = index_cache.cached_arrays(
                stem, names, desc, lambda: dict(zip(names, blending_indices(self.weights, self.num_samples))))
            self._load()
        self._check_sizes()

    def _load(self):
        self.dataset_index, self.dataset_sample_index = (index_cache.load_npy(p) for p in self.paths.values())
        if self.dataset_index.shape != (self.num_samples,):
            raise MegaGPTError(f"{self.paths['dataset_index']}: cached blend index has the wrong length; delete it "
                               f"and rerun")

    def __getstate__(self):
        """Cached arrays travel as paths (see ``GPTDataset.__getstate__``)."""
        state = dict(self.__dict__)
        if self.paths is not None:
            del state["dataset_index"], state["dataset_sample_index"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.paths is not None:
            self._load()

    def _check_sizes(self):
        need = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, need)):
            if len(ds) < n:
                name = getattr(getattr(ds, "shard", None), "prefix", f"dataset {d}")
                raise MegaGPTError(f"blend: {name} has {len(ds)} samples but the blend draws {int(n)} from it")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def source(self, i: int) -> tuple[str, list]:
        return self.datasets[int(self.dataset_index[i])].source(int(self.dataset_sample_index[i]))
