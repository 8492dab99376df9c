"""Tensor parallelism: Megatron-style split layers, vocab-parallel cross-entropy and the TP-aware
random state; nothing here knows about GPT, DeepSpeed or process-group creation.

``TPContext`` is all a layer needs to know about its tensor-parallel group. With ``SERIAL`` (size
1, no group) every layer is a plain Linear/Embedding: the serial model *is* the TP model at tp=1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TPContext:
    group: Any = None                 # torch ProcessGroup of this rank's TP peers (None at tp=1)
    rank: int = 0                     # this rank's index in that group
    size: int = 1
    sequence_parallel: bool = False   # activations between blocks split along the sequence
    rng: Any = None                   # megagpt.tp.random.RNGTracker (per-TP-rank dropout stream)

    def __post_init__(self):
        if self.size > 1 and self.group is None:
            raise ValueError("TPContext: size > 1 needs a process group")
        if self.sequence_parallel and self.size == 1:
            object.__setattr__(self, "sequence_parallel", False)


SERIAL = TPContext()
