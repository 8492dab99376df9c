"""The MFU peak is trustworthy: the dtype the run computes in, a configured value wins, a CPU
figure is the best ever measured on this machine (one busy start-up cannot lower it), and a step
that beats the peak raises it instead of logging MFU above 100%."""
import json

import pytest
import torch

from megagpt.train import metrics


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "PEAK_CACHE", tmp_path / "peak_flops.json")
    return tmp_path / "peak_flops.json"


def test_configured_peak_wins(cache):
    assert metrics.peak_flops(torch.bfloat16, 312.0) == (312e12, "bf16, configured train.peak_tflops")
    assert not cache.exists()


def test_a_busy_start_up_cannot_lower_the_cached_peak(cache, monkeypatch):
    measured = iter([4e9, 1e9, 6e9])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda dtype: next(measured))
    assert metrics.peak_flops(torch.float32)[0] == 4e9
    peak, src = metrics.peak_flops(torch.float32)          # measured 1e9 on a busy machine
    assert peak == 4e9 and "best of 15 timings now and of those cached" in src
    assert metrics.peak_flops(torch.float32)[0] == 6e9      # a better measurement replaces it
    (key, value), = json.loads(cache.read_text()).items()
    assert value == 6e9 and "torch.float32" in key and "threads" in key
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda dtype: 2e9)
    assert metrics.peak_flops(torch.bfloat16)[0] == 2e9     # per dtype


def test_matmul_is_timed_in_the_run_dtype():
    fp32 = metrics.measure_matmul_flops(torch.float32, n=256, reps=3)
    bf16 = metrics.measure_matmul_flops(torch.bfloat16, n=256, reps=3)
    assert fp32 > 0 and bf16 > 0


def test_a_step_faster_than_the_peak_raises_it(tmp_path, capsys):
    m = metrics.Metrics(0, None, str(tmp_path / "log.jsonl"), flops_per_token=1000, tokens_per_step=10 ** 6,
                        world=1, peak=1.0, peak_src="test", total_steps=2, start_step=0, progress_bar=False)
    m.step(1, 2.0, 1e-3, None, 0, log=True)
    out = capsys.readouterr().out
    assert "beats the peak" in out and "MFU 100.0%" in out
    m.close()
