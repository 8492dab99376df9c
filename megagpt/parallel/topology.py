"""ParallelConfig and the rank <-> (pp, dp, tp) mapping: pure functions, no process groups.

Rank order (Megatron's default, and DeepSpeed's ``PipeModelDataParallelTopology`` with axes
``['pipe', 'data', 'model']``): **TP fastest, then DP, then PP**::

    rank = pp * (dp_size * tp) + dp * tp + tp_rank

so the ranks of one TP group are adjacent (one node, fast links), a pipeline stage is a
contiguous block of ``dp_size * tp`` ranks, and DeepSpeed's PipelineModule (which builds its own
grid from the same topology object) agrees with our groups rank for rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from megagpt.errors import MegaGPTError


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left: world // (tp * pp)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False        # split norm/dropout regions along the sequence (needs tp > 1)
    partition_method: str = "parameters"   # PipelineModule stage split: "parameters" | "uniform"
    activation_checkpoint_interval: int = 0  # pipeline: recompute every N layers in backward (0 = off)
    seed: int = 1234

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MegaGPTError(f"parallel config: {name}={v!r} must be an integer >= 1")
        if not isinstance(self.sequence_parallel, bool):
            raise MegaGPTError(f"parallel config: sequence_parallel={self.sequence_parallel!r} must be true/false")
        if self.partition_method not in ("parameters", "uniform"):
            raise MegaGPTError(
                f"parallel config: partition_method={self.partition_method!r} must be 'parameters' or 'uniform'")
        if self.activation_checkpoint_interval < 0:
            raise MegaGPTError(
                f"parallel config: activation_checkpoint_interval={self.activation_checkpoint_interval!r} must be >= 0")

    @classmethod
    def from_dict(cls, d: dict, where: str = "parallel", seed: int | None = None) -> "ParallelConfig":
        """From a config-file section; unknown keys are a MegaGPTError naming them and ``where``."""
        import dataclasses

        known = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise MegaGPTError(f"{where}: expected a mapping of {', '.join(known)}, got {d!r}")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise MegaGPTError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        try:
            return cls(**{**d, **({"seed": seed} if seed is not None else {})})
        except MegaGPTError as e:
            raise MegaGPTError(f"{where}: {e}") from None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise MegaGPTError(
                f"world size {world_size} is not divisible by tensor_parallel * pipeline_parallel = "
                f"{self.tensor_parallel} * {self.pipeline_parallel}")
        return world_size // self.model_parallel_size


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


def deepspeed_topology(world_size: int, tp: int, pp: int):
    """The same layout as DeepSpeed's topology object (for PipelineModule(topology=...))."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp_size = ParallelConfig(tp, pp).data_parallel_size(world_size)
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp_size)
