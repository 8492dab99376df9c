"""``DataConfig``: which shards to read, how to blend and split them, and the window length.

Validated on construction so a typo in ``--data-path`` or ``--split`` fails at start-up with the
bad value named, not minutes later when the first sample is drawn.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megagpt.data import indexed
from megagpt.errors import MegaGPTError


def _as_weight(x):
    """``x`` as a float if it reads as a number (``0.7`` or ``"0.7"``), else None (a prefix)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@dataclass
class DataConfig:
    """Megatron-style data options.

    ``data_path``: ``[prefix]``, ``[prefix, prefix, ...]`` (weight 1 each) or
    ``[w1, prefix1, w2, prefix2, ...]`` (as ``--data-path 0.7 a 0.3 b``); weights are normalised.
    ``split``: train/valid/test document ratios, e.g. ``"969,30,1"`` (normalised).
    ``cache_dir``: where index arrays go; None = next to each shard (or a user cache dir if that
    directory is read-only).
    """

    data_path: list
    split: str = "969,30,1"
    seq_length: int = 1024
    seed: int = 1234
    cache_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.data_path, (str, os.PathLike)):
            self.data_path = [os.fspath(self.data_path)]
        self.data_path = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in self.data_path]
        self._prefixes, self._weights = self._parse_data_path(self.data_path)
        self._split = self._parse_split(self.split)
        for key in ("seq_length", "seed"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int):
                raise MegaGPTError(f"data config: {key}={val!r} must be an integer")
        if self.seq_length < 1:
            raise MegaGPTError(f"data config: seq_length={self.seq_length} must be >= 1")
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)

    @staticmethod
    def _parse_data_path(items):
        if not items:
            raise MegaGPTError("data config: data_path is empty; give a shard prefix (PREFIX for PREFIX.bin/.idx)")
        if _as_weight(items[0]) is None:  # prefixes only: weight 1 each
            pairs = [(1.0, p) for p in items]
        else:
            if len(items) % 2:
                raise MegaGPTError(
                    f"data config: data_path={items!r} has {len(items)} entries; a weighted list "
                    f"must alternate weight and prefix (w1 p1 w2 p2 ...)")
            pairs = [(_as_weight(w), p) for w, p in zip(items[0::2], items[1::2])]
            for (w, p), raw in zip(pairs, items[0::2]):
                if w is None:
                    raise MegaGPTError(f"data config: data_path weight {raw!r} (before {p!r}) is not a number")
                if not math.isfinite(w) or w <= 0:
                    raise MegaGPTError(f"data config: data_path weight {raw!r} for {p!r} must be a positive number")
        prefixes = []
        for _, p in pairs:
            if not isinstance(p, str) or _as_weight(p) is not None:
                raise MegaGPTError(f"data config: data_path entry {p!r} should be a shard prefix (weights and "
                                   f"prefixes must alternate, or give prefixes only)")
            missing = [f for f in (indexed.bin_path(p), indexed.idx_path(p)) if not os.path.isfile(f)]
            if missing:
                raise MegaGPTError(f"data config: data_path prefix {p!r}: missing {', '.join(missing)}")
            prefixes.append(p)
        total = sum(w for w, _ in pairs)
        return prefixes, [w / total for w, _ in pairs]

    @staticmethod
    def _parse_split(split):
        parts = split.replace("/", ",").split(",") if isinstance(split, str) else list(split)
        try:
            vals = [float(x) for x in parts]
        except (TypeError, ValueError):
            vals = None
        if (vals is None or len(vals) != 3 or any(not math.isfinite(v) or v < 0 for v in vals)
                or sum(vals) <= 0):
            raise MegaGPTError(f"data config: split={split!r} must be 3 non-negative numbers with a positive "
                               f"sum, train,valid,test (e.g. \"969,30,1\")")
        total = sum(vals)
        return tuple(v / total for v in vals)

    @property
    def prefixes(self) -> list[str]:
        return list(self._prefixes)

    @property
    def weights(self) -> list[float]:
        """Normalised blend weights, one per prefix."""
        return list(self._weights)

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        """Normalised (train, valid, test) document fractions."""
        return self._split
