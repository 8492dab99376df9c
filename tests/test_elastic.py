"""Elastic resume through the real pretraining entry: a run saved on one layout continues on
another — DP 2 -> 1 -> 4 with other micro-batch/accumulation splits of the same global batch
(ZeRO-2), DP 2 -> 1 under ZeRO-0, TP 2 -> 1, PP 2 -> 1 — carrying weights, Adam state, LR schedule and data position.

Proved by: every step's training-sample ids (``debug.sample_ids``) are exactly the unmoved run's
(so no sample is repeated or skipped), and every loss after the move equals the unmoved run's
within the layouts' fp32 reduction tolerance (``LAYOUT_TOL``). A wrong or missing Adam moment,
weight, LR-scheduler state or data position moves the losses by far more than that (planted:
not setting ``exp_avg`` gives a gap of 0.11).
"""
import json
import shutil

import pytest
import yaml

from test_layouts import LAYOUT_TOL, legacy, legacy_data, val_losses  # noqa: F401  (legacy_data: the fixture)
from test_train_runs import launch, losses, ok

pytestmark = pytest.mark.slow


def config(path, data, **kw):
    legacy.config(path, *data, save_interval=0, keep_last=0, eval_interval=3, eval_iters=1, **kw)
    cfg = yaml.safe_load(path.read_text())
    cfg["debug"] = {"sample_ids": True}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def sample_ids(save):
    """{step: sorted ids of all ranks}."""
    steps = {}
    for f in sorted(save.glob("samples_rank*.jsonl")):
        for rec in map(json.loads, f.read_text().splitlines()):
            steps.setdefault(rec["step"], set()).update(rec["ids"])
    return {s: sorted(v) for s, v in steps.items()}


def assert_continues(straight, moved, n_steps):
    want, got = losses(straight), losses(moved)
    assert sorted(got) == sorted(want) == list(range(1, n_steps + 1)), (sorted(want), sorted(got))
    gaps = {s: abs(got[s] - want[s]) for s in want}
    print(f"elastic: max |loss gap| {max(gaps.values()):.3g} over {n_steps} steps")   # docs/parallelism.md
    assert max(gaps.values()) < LAYOUT_TOL, gaps
    want, got = val_losses(straight), val_losses(moved)   # the same validation samples after the move too
    assert sorted(got) == sorted(want) and len(want) >= 2, (want, got)
    assert max(abs(got[s] - want[s]) for s in want) < LAYOUT_TOL, (want, got)
    ids = sample_ids(moved)
    assert ids == sample_ids(straight), "the moved run saw other samples"
    every = [i for s in sorted(ids) for i in ids[s]]
    assert len(every) == len(set(every)), "a sample was repeated"


@pytest.fixture(scope="module")
def dp2_at_step_4(tmp_path_factory, legacy_data):  # noqa: F811
    """(config, save dir): 2 ranks x micro 2 x accumulation 2 (global batch 8, ZeRO-2), stopped at step 4.
    Launched once; each test continues or loads its own copy."""
    d = tmp_path_factory.mktemp("dp2_at_step_4")
    cfg = config(d / "c.yaml", legacy_data, train_iters=12, micro_batch_size=2, gradient_accumulation_steps=2)
    ok(launch(cfg, "zero2.json", d / "ckpt", "--exit-interval", "4"))
    return cfg, d / "ckpt"


def test_data_parallel_2_to_1_to_4_with_other_micro_batches(tmp_path, dp2_at_step_4):
    """Global batch 8 throughout: 2 ranks x micro 2 x accumulation 2, then 1 rank x 2 x 4, then
    4 ranks x 1 x 2 (ZeRO-2: the optimizer partitions are re-cut at each move)."""
    cfg, first_leg = dp2_at_step_4
    ok(launch(cfg, "zero2.json", tmp_path / "straight"))
    save = tmp_path / "moved"
    shutil.copytree(first_leg, save)
    r = ok(launch(cfg, "zero2.json", save, "--load", str(save), "--gradient-accumulation-steps", "4",
                  "--exit-interval", "8", ranks=1))
    assert "elastic resume" in r.stdout and "dp=2" in r.stdout and "dp=1" in r.stdout, r.stdout[-2000:]
    r = ok(launch(cfg, "zero2.json", save, "--load", str(save), "--micro-batch-size", "1", ranks=4, timeout=600))
    assert "resumed from" in r.stdout and "at step 8" in r.stdout
    assert_continues(tmp_path / "straight", save, 12)


@pytest.mark.parametrize("ds, parallel, batch", [
    ("zero1.json", {"tensor_parallel": 2, "sequence_parallel": True}, []),
    ("zero1.json", {"pipeline_parallel": 2}, []),
    ("zero0.json", {}, ["--gradient-accumulation-steps", "2"]),   # ZeRO-0: Adam state in the model-states file
], ids=["tp2_sp", "pp2", "zero0_dp2"])
def test_model_or_data_parallel_2_to_serial(tmp_path, legacy_data, ds, parallel, batch):  # noqa: F811
    cfg = config(tmp_path / "c.yaml", legacy_data, train_iters=10, parallel=parallel)
    ok(launch(cfg, ds, tmp_path / "straight"))
    save = tmp_path / "moved"
    ok(launch(cfg, ds, save, "--exit-interval", "4"))
    r = ok(launch(cfg, ds, save, "--load", str(save), "--tensor-model-parallel-size", "1",
                  "--pipeline-model-parallel-size", "1", "--no-sequence-parallel", *batch, ranks=1))
    assert "elastic resume" in r.stdout and "at step 4" in r.stdout, r.stdout[-2000:]
    assert_continues(tmp_path / "straight", save, 10)


def test_another_global_batch_is_refused_in_one_line(tmp_path, dp2_at_step_4):
    """Saved with global batch 8 (2 ranks x micro 2 x accumulation 2); 1 rank with the same config has 4."""
    cfg, first_leg = dp2_at_step_4
    save = tmp_path / "ckpt"
    shutil.copytree(first_leg, save)
    r = launch(cfg, "zero2.json", save, "--load", str(save), ranks=1)
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "global batch of 8" in errors[0] and "--gradient-accumulation-steps 4" in errors[0], \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
