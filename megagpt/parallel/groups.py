"""ParallelState: this rank's coordinates and process groups, built once and passed explicitly.

``build_parallel_state(cfg)`` needs ``torch.distributed`` initialised (every rank calls it; group
creation is collective). ``state.mpu`` is the adapter ``deepspeed.initialize(mpu=...)`` reads
(DeepSpeed 0.19.8: ZeRO partitioning over the DP group, grad-norm/overflow sums over the
model-parallel group, ``mp_rank_XX`` checkpoint names). "Model parallel" there means TP x PP (as
in Megatron and DeepSpeed's PipelineParallelGrid); the tensor variants mean TP only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch.distributed as dist

from megagpt.errors import MegaGPTError
from megagpt.tp import TPContext
from megagpt.tp.random import RNGTracker

from .topology import Coord, ParallelConfig, group_ranks, rank_to_coord

# What DeepSpeed calls on ``mpu`` (Megatron's parallel_state interface): get_<name>() for each name.
_MPU = {
    "model_parallel_rank": lambda s: s.ranks["mp"].index(s.rank),
    "model_parallel_world_size": lambda s: len(s.ranks["mp"]),
    "model_parallel_group": lambda s: s.groups["mp"],
    "tensor_model_parallel_rank": lambda s: s.tp_rank,
    "tensor_model_parallel_world_size": lambda s: s.tp_size,
    "tensor_model_parallel_group": lambda s: s.tp_group,
    "tensor_model_parallel_src_rank": lambda s: s.ranks["tp"][0],
    "pipeline_model_parallel_rank": lambda s: s.pp_rank,
    "pipeline_model_parallel_world_size": lambda s: s.pp_size,
    "pipeline_model_parallel_group": lambda s: s.pp_group,
    "pipe_parallel_rank": lambda s: s.pp_rank,
    "pipe_parallel_world_size": lambda s: s.pp_size,
    "pipe_parallel_group": lambda s: s.pp_group,
    "data_parallel_rank": lambda s: s.dp_rank,
    "data_parallel_world_size": lambda s: s.dp_size,
    "data_parallel_group": lambda s: s.dp_group,
    "data_parallel_group_ranks": lambda s: list(s.ranks["dp"]),
}


@dataclass
class ParallelState:
    config: ParallelConfig
    rank: int
    world_size: int
    coord: Coord
    dp_size: int
    groups: dict = field(repr=False)       # kind -> torch ProcessGroup containing this rank
    ranks: dict = field(repr=False)        # kind -> list of global ranks in that group
    rng: RNGTracker = field(repr=False)    # TP-aware dropout/init random state (random.py)

    tp_size = property(lambda self: self.config.tensor_parallel)
    pp_size = property(lambda self: self.config.pipeline_parallel)
    tp_rank = property(lambda self: self.coord.tp)
    pp_rank = property(lambda self: self.coord.pp)
    dp_rank = property(lambda self: self.coord.dp)
    tp_group = property(lambda self: self.groups["tp"])
    dp_group = property(lambda self: self.groups["dp"])
    pp_group = property(lambda self: self.groups["pp"])
    sequence_parallel = property(lambda self: self.config.sequence_parallel and self.tp_size > 1)
    is_first_stage = property(lambda self: self.coord.pp == 0)
    is_last_stage = property(lambda self: self.coord.pp == self.pp_size - 1)
    # Only the first (input_ids) and last (labels) pipeline stages read batches; others build no data.
    needs_data = property(lambda self: self.is_first_stage or self.is_last_stage)

    @property
    def tp(self) -> TPContext:
        return TPContext(self.tp_group if self.tp_size > 1 else None, self.tp_rank, self.tp_size,
                         self.sequence_parallel, self.rng)

    @property
    def mpu(self) -> SimpleNamespace:
        return SimpleNamespace(**{f"get_{name}": functools.partial(get, self) for name, get in _MPU.items()})

    def topology(self):
        """The same layout as DeepSpeed's topology object (for PipelineModule(topology=...))."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp_size, num_mp=self.tp_size, num_dp=self.dp_size)


# The groups this process made, by (kind, members, timeout), for the default group under "world". A
# process that builds the same layout again (finetune() called in a loop, a sweep) gets the same groups:
# each new gloo group keeps transport threads for the life of the process, and DeepSpeed holds on to
# the ones it was given, so they cannot be destroyed instead.
_GROUPS: dict = {}


def _group(kind: str, members: list, timeout):
    world = dist.distributed_c10d._get_default_group()
    if _GROUPS.get("world") is not world:   # the first layout, or a default group made anew
        _GROUPS.clear()
        _GROUPS["world"] = world
    key = (kind, tuple(members), timeout)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(ranks=members, timeout=timeout)
    return _GROUPS[key]


def build_parallel_state(cfg: ParallelConfig, timeout=None) -> ParallelState:
    """The groups of ``cfg``'s layout (``timeout``: a timedelta for their collectives; torch's default if None).
    Built again in the same process with the same default group, it hands back the same groups."""
    if not dist.is_initialized():
        raise MegaGPTError("build_parallel_state: torch.distributed is not initialised "
                           "(run under the deepspeed launcher or call deepspeed.init_distributed first)")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_size = cfg.data_parallel_size(world)
    if cfg.sequence_parallel and cfg.tensor_parallel == 1:
        raise MegaGPTError("parallel config: sequence_parallel=true needs tensor_parallel > 1")
    groups, ranks = {}, {}
    for kind, lists in group_ranks(world, cfg.tensor_parallel, cfg.pipeline_parallel).items():
        for members in lists:                      # every rank creates every group, same order
            g = _group(kind, members, timeout)
            if rank in members:
                groups[kind], ranks[kind] = g, members
    coord = rank_to_coord(rank, world, cfg.tensor_parallel, cfg.pipeline_parallel)
    rng = RNGTracker(cfg.seed, coord.tp, coord.pp)
    rng.seed_default()
    return ParallelState(cfg, rank, world, coord, dp_size, groups, ranks, rng)

