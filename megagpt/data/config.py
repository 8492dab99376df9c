"""``DataConfig``: which shards to read, how to blend and split them, and the window length.

Validated on construction so a typo in ``--data-path`` or ``--split`` fails at start-up with the
bad value named, not minutes later when the first sample is drawn.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from megagpt.data import indexed
from megagpt.errors import MegaGPTError
from megagpt.schema import Section, field


def _as_weight(x):
    """``x`` as a float if it reads as a number (``0.7`` or ``"0.7"``), else None (a prefix)."""
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


@dataclass
class DataConfig(Section):
    """Megatron-style data options: the ``data:`` section of a run config.

    ``data_path`` weights (1 each when only prefixes are given) and ``split`` ratios are normalised.
    ``seq_length`` is None until a run config fills in ``model.max_seq_len``; ``build_gpt_datasets``
    needs it set. A null ``cache_dir`` falls back to a user cache dir when a shard's is read-only.
    """

    data_path: list = field(default_factory=list, help="shard prefix(es) PREFIX (for PREFIX.bin/.idx), or "
                                                       "weight prefix pairs: 0.7 a 0.3 b", default_text="[]")
    tokenizer: Optional[str] = field(None, help="the tokenizer the shards were made with")
    split: str = field("969,30,1", help="train,valid,test document proportions")
    seq_length: Optional[int] = field(None, min=1, help="tokens per sample", default_text="model.max_seq_len")
    seed: int = field(1234, flags=("--data-seed",), help="seed of the document shuffle and blend")
    cache_dir: Optional[str] = field(None, help="where the index arrays are cached (null = beside each shard)")
    # document masking of packed samples (Megatron's names; gpt_dataset.PackingOptions, docs/architecture.md)
    reset_attention_mask: bool = field(False, help="a token never attends across an end-of-document token "
                                                   "within a packed sample (block-diagonal causal attention)")
    reset_position_ids: bool = field(False, help="positions restart at 0 after each end-of-document token")
    eod_mask_loss: bool = field(False, help="no loss at positions whose input is the end-of-document token (Megatron-LM's rule)")

    def __post_init__(self):
        if isinstance(self.data_path, (str, os.PathLike)):
            self.data_path = [os.fspath(self.data_path)]
        if isinstance(self.data_path, (list, tuple)):
            self.data_path = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in self.data_path]
        if isinstance(self.cache_dir, os.PathLike):
            self.cache_dir = os.fspath(self.cache_dir)
        super().__post_init__()

    def _check(self) -> None:
        # derived and normalised: the prefixes with their blend weights, (train, valid, test) document fractions
        self.prefixes, self.weights = self._parse_data_path(self.data_path)
        self.split_ratios = self._parse_split(self.split)
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise MegaGPTError(f"tokenizer {self.tokenizer} does not exist", key="tokenizer")

    @staticmethod
    def _parse_data_path(items):
        if not items:
            raise MegaGPTError("data_path is empty; give a shard prefix (PREFIX for PREFIX.bin/.idx)", key="data_path")
        if _as_weight(items[0]) is None:  # prefixes only: weight 1 each
            pairs = [(1.0, p) for p in items]
        else:
            if len(items) % 2:
                raise MegaGPTError(
                    f"data_path={items!r} has {len(items)} entries; a weighted list "
                    f"must alternate weight and prefix (w1 p1 w2 p2 ...)", key="data_path")
            pairs = [(_as_weight(w), p) for w, p in zip(items[0::2], items[1::2])]
            for (w, p), raw in zip(pairs, items[0::2]):
                if w is None:
                    raise MegaGPTError(f"data_path weight {raw!r} (before {p!r}) is not a number", key="data_path")
                if not math.isfinite(w) or w <= 0:
                    raise MegaGPTError(f"data_path weight {raw!r} for {p!r} must be a positive number", key="data_path")
        for _, p in pairs:
            if not isinstance(p, str) or _as_weight(p) is not None:
                raise MegaGPTError(f"data_path entry {p!r} should be a shard prefix (weights and "
                                   f"prefixes must alternate, or give prefixes only)", key="data_path")
            missing = [f for f in (indexed.bin_path(p), indexed.idx_path(p)) if not os.path.isfile(f)]
            if missing:
                raise MegaGPTError(f"data_path prefix {p!r}: missing {', '.join(missing)}", key="data_path")
        total = sum(w for w, _ in pairs)
        return [p for _, p in pairs], [w / total for w, _ in pairs]

    @staticmethod
    def _parse_split(split: str):  # a str: the field's type is checked before _check
        vals = [_as_weight(x) for x in split.replace("/", ",").split(",")]
        if len(vals) != 3 or any(v is None or not math.isfinite(v) or v < 0 for v in vals) or sum(vals) <= 0:
            raise MegaGPTError(f"split={split!r} must be 3 non-negative numbers with a positive "
                               f"sum, train,valid,test (e.g. \"969,30,1\")", key="split")
        total = sum(vals)
        return tuple(v / total for v in vals)
