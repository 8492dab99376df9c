"""DistributedBatchSampler: DP slices partition each global batch; resume continues exactly."""
import numpy as np
import pytest
import torch

from megagpt.data import DistributedBatchSampler
from megagpt.errors import MegaGPTError


def run(total, consumed, mbs, dp, drop_last=True):
    return [list(DistributedBatchSampler(total, consumed, mbs, r, dp, drop_last)) for r in range(dp)]


@pytest.mark.parametrize("mbs, dp", [(1, 1), (4, 1), (2, 3), (3, 4)])
def test_ranks_partition_each_global_batch_in_order(mbs, dp):
    total = 100
    per_rank = run(total, 0, mbs, dp)
    steps = total // (mbs * dp)
    assert all(len(b) == steps for b in per_rank)
    for t in range(steps):
        slices = [per_rank[r][t] for r in range(dp)]
        assert all(len(s) == mbs for s in slices)
        assert sum(slices, []) == list(range(t * mbs * dp, (t + 1) * mbs * dp))  # disjoint, covering
    assert len(DistributedBatchSampler(total, 0, mbs, 0, dp)) == steps


@pytest.mark.parametrize("consumed", [0, 6, 24, 96])
def test_resume_continues_exactly(consumed):
    mbs, dp, total = 3, 2, 103
    full = run(total, 0, mbs, dp)
    resumed = run(total, consumed, mbs, dp)
    skip = consumed // (mbs * dp)
    for r in range(dp):
        assert resumed[r] == full[r][skip:]
        assert resumed[r] and resumed[r][0][0] == consumed + r * mbs


def test_partial_last_batch():
    # 23 samples, global batch 6: 3 full steps, then 5 left split as [18,19] [20,21] [22]
    per_rank = run(23, 0, 2, 3, drop_last=False)
    assert [b[-1] for b in per_rank] == [[18, 19], [20, 21], [22]]
    assert run(23, 0, 2, 3, drop_last=True)[2][-1] == [16, 17]
    # a rank whose slice is empty yields nothing for that step
    per_rank = run(20, 0, 2, 3, drop_last=False)
    assert [len(b) for b in per_rank] == [4, 3, 3]
    assert [len(DistributedBatchSampler(20, 0, 2, r, 3, drop_last=False)) for r in range(3)] == [4, 3, 3]


def test_with_dataloader():
    data = torch.arange(40).reshape(20, 2)
    sampler = DistributedBatchSampler(20, 4, 2, dp_rank=1, dp_size=2)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert batches[0] == [[12, 13], [14, 15]] and len(batches) == 4
    assert np.concatenate(batches).shape == (8, 2)


@pytest.mark.parametrize("args, match", [
    ((10, 0, 2, 2, 2), r"dp_rank=2 must be < dp_size=2"),
    ((10, 3, 2, 0, 2), r"consumed_samples=3 is not a multiple of .* = 4"),
    ((10, 12, 2, 0, 2), r"consumed_samples=12 leaves nothing"),
    ((12, 6, 2, 0, 4), r"consumed_samples=6 is not a multiple of .* = 8"),
    ((10, 8, 2, 0, 2), r"2 samples left, fewer than one global micro-batch of 4"),
    ((10, 0, 0, 0, 2), r"micro_batch_size=0"),
    ((10, 0, 2, 0, 0), r"dp_size=0"),
    ((10, -4, 2, 0, 2), r"consumed_samples=-4"),
    ((0, 0, 2, 0, 2), r"total_samples=0"),
    ((10, 0, 2.0, 0, 2), r"micro_batch_size=2.0"),
])
def test_bad_arguments(args, match):
    with pytest.raises(MegaGPTError, match=match):
        DistributedBatchSampler(*args)
