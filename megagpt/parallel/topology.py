"""ParallelConfig and the rank <-> (pp, dp, tp) mapping: pure functions, no process groups.

Rank order (Megatron's default, and DeepSpeed's ``PipeModelDataParallelTopology`` with axes
``['pipe', 'data', 'model']``): TP fastest, then DP, then PP, ``rank = (pp * dp_size + dp) * tp + tp_rank``.
The ranks of one TP group are adjacent (one node, fast links), and DeepSpeed's PipelineModule (which
builds its own grid from the same topology) agrees with our groups rank for rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from megagpt.errors import MegaGPTError
from megagpt.schema import Section, field


@dataclass(frozen=True)
class ParallelConfig(Section):
    """Model-parallel layout; the data-parallel size is what is left: world // (tp * pp).
    ``ParallelConfig.from_dict(section, seed=...)``: ``seed`` is train.seed, not a key of this section."""

    tensor_parallel: int = field(1, min=1, flags=("--tensor-parallel", "--tensor-model-parallel-size"),
                                 help="tensor-parallel degree (splits heads, MLP and vocabulary)")
    pipeline_parallel: int = field(1, min=1, flags=("--pipeline-parallel", "--pipeline-model-parallel-size"),
                                   help="pipeline stages")
    sequence_parallel: bool = field(False, help="split norm/dropout regions along the sequence inside "
                                                "tensor-parallel groups (needs tensor_parallel > 1)")
    partition_method: str = field("parameters", choices=("parameters", "uniform"),
                                  help="how the pipeline's layers are split into stages")
    activation_checkpoint_interval: int = field(0, min=0, help="pipeline: recompute every N layers in "
                                                               "backward, 0 = off")
    seed: int = field(1234, yaml=False, help="seeds the model-parallel RNG streams (from train.seed)")

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % (self.tensor_parallel * self.pipeline_parallel):
            raise MegaGPTError(
                f"world size {world_size} is not divisible by tensor_parallel * pipeline_parallel = "
                f"{self.tensor_parallel} * {self.pipeline_parallel}")
        return world_size // (self.tensor_parallel * self.pipeline_parallel)


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int


def rank_to_coord(rank: int, world_size: int, tp: int, pp: int) -> Coord:
    """(pp, dp, tp) coordinates of ``rank``: TP fastest, then DP, then PP."""
    dp_size = ParallelConfig(tp, pp).data_parallel_size(world_size)
    if not 0 <= rank < world_size:
        raise MegaGPTError(f"rank {rank} out of range for world size {world_size}")
    return Coord(pp=rank // (dp_size * tp), dp=(rank // tp) % dp_size, tp=rank % tp)


def coord_to_rank(coord: Coord, world_size: int, tp: int, pp: int) -> int:
    dp_size = ParallelConfig(tp, pp).data_parallel_size(world_size)
    if not (0 <= coord.pp < pp and 0 <= coord.dp < dp_size and 0 <= coord.tp < tp):
        raise MegaGPTError(f"coordinate {coord} out of range for pp={pp}, dp={dp_size}, tp={tp}")
    return (coord.pp * dp_size + coord.dp) * tp + coord.tp


def group_ranks(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of each kind, as rank lists (all ranks must create all groups, in this order).

    tp: same (pp, dp), varying tp — the tensor-parallel group (all-reduces inside a layer).
    dp: same (pp, tp), varying dp — gradient averaging and ZeRO sharding.
    pp: same (dp, tp), varying pp — the stages one micro-batch flows through.
    mp: same dp, varying (pp, tp) — "model parallel" in DeepSpeed's sense (grad-norm sums).
    """
    dp_size = ParallelConfig(tp, pp).data_parallel_size(world_size)
    r = lambda p, d, t: coord_to_rank(Coord(p, d, t), world_size, tp, pp)  # noqa: E731
    return {
        "tp": [[r(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp_size)],
        "dp": [[r(p, d, t) for d in range(dp_size)] for p in range(pp) for t in range(tp)],
        "pp": [[r(p, d, t) for p in range(pp)] for d in range(dp_size) for t in range(tp)],
        "mp": [sorted(r(p, d, t) for p in range(pp) for t in range(tp)) for d in range(dp_size)],
    }

