"""Data-parallel micro-batch sampler that resumes exactly from a consumed-samples count.

The dataset is already shuffled, so the global order is 0, 1, 2, ...: global micro-step ``t``
uses ``[t*G, (t+1)*G)`` (``G = micro_batch_size * dp_size``) and rank ``r`` its slice
``[r*mbs, (r+1)*mbs)``. The order depends on nothing but the index, so a run resumed at a
checkpoint's ``consumed_samples`` sees exactly the batches of the uninterrupted run.
"""
from __future__ import annotations

from megagpt.errors import MegaGPTError


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MegaGPTError(f"batch sampler: {name}={value!r} must be an integer >= {minimum}")


class DistributedBatchSampler:
    """Yields this rank's slice (a list of sample indices) of each global micro-batch after ``consumed_samples``;
    with ``drop_last=False`` a final partial one is split alike (an empty slice yields nothing)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        _check_int("total_samples", total_samples, 1)
        _check_int("consumed_samples", consumed_samples, 0)
        _check_int("micro_batch_size", micro_batch_size, 1)
        _check_int("dp_size", dp_size, 1)
        _check_int("dp_rank", dp_rank, 0)
        if dp_rank >= dp_size:
            raise MegaGPTError(f"batch sampler: dp_rank={dp_rank} must be < dp_size={dp_size}")
        global_mb = micro_batch_size * dp_size
        if consumed_samples % global_mb:
            raise MegaGPTError(
                f"batch sampler: consumed_samples={consumed_samples} is not a multiple of micro_batch_size * "
                f"dp_size = {global_mb}; a checkpoint taken at another batch layout cannot resume exactly")
        if consumed_samples >= total_samples:
            raise MegaGPTError(f"batch sampler: consumed_samples={consumed_samples} leaves nothing of "
                               f"total_samples={total_samples}")
        if drop_last and total_samples - consumed_samples < global_mb:
            raise MegaGPTError(
                f"batch sampler: {total_samples - consumed_samples} samples left, fewer than one global "
                f"micro-batch of {global_mb} (micro_batch_size={micro_batch_size} x dp_size={dp_size})")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.drop_last, self.global_micro_batch = drop_last, global_mb

    def __iter__(self):
        mbs, g = self.micro_batch_size, self.global_micro_batch
        for start in range(self.consumed_samples, self.total_samples, g):
            end = min(start + g, self.total_samples)
            if end - start < g and self.drop_last:
                return
            lo, hi = start + self.dp_rank * mbs, min(start + (self.dp_rank + 1) * mbs, end)
            if lo < hi:
                yield list(range(lo, hi))

    def __len__(self) -> int:
        full, rest = divmod(self.total_samples - self.consumed_samples, self.global_micro_batch)
        return full + int(not self.drop_last and rest > self.dp_rank * self.micro_batch_size)
