"""Rank <-> (pp, dp, tp) mapping: a bijection, TP fastest then DP then PP, identical to DeepSpeed's
PipeModelDataParallelTopology (which PipelineModule builds its grid from), and groups that
partition the world. Pure functions: no processes."""
import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megagpt.errors import MegaGPTError
from megagpt.parallel.layout import check_zero_stage
from megagpt.parallel.topology import Coord, ParallelConfig, coord_to_rank, group_ranks, rank_to_coord

LAYOUTS = [(w, tp, pp) for w in (1, 2, 4, 6, 8, 12, 16, 24, 64)
           for tp in (1, 2, 3, 4, 8) for pp in (1, 2, 3, 4) if w % (tp * pp) == 0]


@pytest.mark.parametrize("world,tp,pp", LAYOUTS)
def test_rank_coord_roundtrip_and_deepspeed_agreement(world, tp, pp):
    dp = world // (tp * pp)
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    seen = set()
    for rank in range(world):
        c = rank_to_coord(rank, world, tp, pp)
        assert coord_to_rank(c, world, tp, pp) == rank
        seen.add(c)
        d = ds.get_coord(rank)
        assert (c.pp, c.dp, c.tp) == (d.pipe, d.data, d.model)
    assert seen == {Coord(p, d, t) for p, d, t in itertools.product(range(pp), range(dp), range(tp))}
    # TP fastest: consecutive ranks share (pp, dp) within a TP group
    if tp > 1:
        assert rank_to_coord(1, world, tp, pp) == Coord(0, 0, 1)
    groups = group_ranks(world, tp, pp)
    for kind, size in (("tp", tp), ("dp", dp), ("pp", pp), ("mp", tp * pp)):
        flat = sorted(r for g in groups[kind] for r in g)
        assert flat == list(range(world)), kind            # a partition of the world
        assert all(len(g) == size for g in groups[kind]), kind
    for g in groups["dp"]:   # a DP group: same (pp, tp)
        assert len({(rank_to_coord(r, world, tp, pp).pp, rank_to_coord(r, world, tp, pp).tp) for r in g}) == 1
    assert sorted(map(sorted, groups["dp"])) == sorted(map(sorted, ds.get_axis_comm_lists("data"))) or dp == 1


def test_bad_layouts_are_refused():
    with pytest.raises(MegaGPTError, match="world size 6 is not divisible"):
        rank_to_coord(0, 6, 4, 1)
    with pytest.raises(MegaGPTError, match="tensor_parallel=0"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(MegaGPTError, match="partition_method"):
        ParallelConfig(partition_method="type:x")
    with pytest.raises(MegaGPTError, match="out of range"):
        coord_to_rank(Coord(0, 0, 2), 4, 2, 1)
    with pytest.raises(MegaGPTError, match=r"unknown key\(s\) 'tensor_paralel'") as e:
        ParallelConfig.from_dict({"tensor_paralel": 2})
    assert e.value.key == "tensor_paralel"
    with pytest.raises(MegaGPTError, match="pipeline_parallel=-1 must be >= 1") as e:
        ParallelConfig.from_dict({"pipeline_parallel": -1})
    assert e.value.key == "pipeline_parallel"
    cfg = ParallelConfig.from_dict({"tensor_parallel": 2, "sequence_parallel": True}, seed=7)
    assert (cfg.tensor_parallel, cfg.sequence_parallel, cfg.seed) == (2, True, 7)


def test_zero2_with_pipeline_is_refused():
    with pytest.raises(MegaGPTError, match="zero_optimization.stage=2 cannot be combined with pipeline_parallel=2"):
        check_zero_stage({"zero_optimization": {"stage": 2}}, 2)
    check_zero_stage({"zero_optimization": {"stage": 1}}, 2)
    check_zero_stage({"zero_optimization": {"stage": 3}}, 1)


def test_deepspeed_pipeline_engine_still_asserts_zero_below_2():
    """Our refusal mirrors DeepSpeed's own check; if DeepSpeed lifts it, this test says so."""
    import inspect

    from deepspeed.runtime.pipe.engine import PipelineEngine

    src = inspect.getsource(PipelineEngine.__init__)
    assert "ZeroStageEnum.gradients" in src and "incompatible with pipeline parallelism" in src
