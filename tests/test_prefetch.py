"""The training loop's data prefetch: the next step's batches are read while the current step
computes, in sampler order; a reading error reaches the training thread; close() stops the thread."""
import time

import numpy as np
import pytest

from megagpt.data import DistributedBatchSampler
from megagpt.train.loop import Prefetcher


class SlowDataset:
    """Sample i = [i, i+1, ..., i+4]; each read takes ``delay`` seconds; index ``bad`` fails."""

    def __init__(self, n, delay, bad=None):
        self.n, self.delay, self.bad = n, delay, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        if i == self.bad:
            raise OSError(f"sample {i}: I/O error")
        return {"tokens": np.arange(i, i + 5)}


def test_batches_arrive_in_order_and_are_read_ahead():
    ds = SlowDataset(64, delay=0.02)
    pf = Prefetcher(ds, DistributedBatchSampler(64, 8, 2, 0, 1), ga=2, device="cpu")
    (ids, micro), first_wait = pf.next()   # nothing read yet: waits for 4 reads
    assert ids == [[8, 9], [10, 11]] and micro[0][0][:, 0].tolist() == [8, 9]
    assert micro[1][1][:, -1].tolist() == [14, 15]   # labels: the inputs shifted by one
    time.sleep(0.3)                         # the "step": the next batch is read meanwhile
    (ids, _), second_wait = pf.next()
    assert ids == [[12, 13], [14, 15]] and second_wait < first_wait / 3, (first_wait, second_wait)
    pf.close()
    assert not pf.thread.is_alive()


def test_a_read_error_is_raised_in_the_training_thread():
    pf = Prefetcher(SlowDataset(16, delay=0, bad=3), DistributedBatchSampler(16, 0, 2, 0, 1), ga=1, device="cpu")
    pf.next()
    with pytest.raises(OSError, match="sample 3: I/O error"):
        pf.next()
    pf.close()
