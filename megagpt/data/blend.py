"""Weighted blend of several datasets in a fixed, deterministic interleaving.

Megatron's greedy "largest error first" rule: before drawing sample k, every dataset's error is
``weight * max(k, 1) - drawn_so_far`` and the dataset furthest behind (lowest index on ties) gives
the next sample. Any prefix of the stream then matches the weights to within about one sample
per dataset, which a random draw cannot promise. The result equals megatron-core's
``build_blending_indices`` bit for bit (the tests check this), so blends are comparable.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from megagpt.data import index_cache
from megagpt.errors import MegaGPTError

CLASS_VERSION = 1


def blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index): sample k is ``datasets[dataset_index[k]][dataset_sample_index[k]]``.
    A plain loop (about 1 s per million samples for a few datasets) because each choice depends
    on all earlier ones; ``BlendedDataset`` caches the result on disk."""
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
