"""Resume is bit-exact, through the real pretraining entry (`deepspeed` launcher, 2 gloo ranks):
a run stopped at step 5 (`--exit-interval 5`) and relaunched with the same command to step 25
logs every loss of the run that never stopped, and its final checkpoint holds the same tensors —
every weight, fp32 master, Adam moment and step counter of every rank's files — for ZeRO 0, 1,
2, 3, TP=2 + sequence parallelism and PP=2, with dropout on and off.

What it guards (each planted and seen failing): DeepSpeed's CPU Adam kernel keeping its beta
powers outside the checkpoint (``checkpoint.engine.resync_cpu_adam``), the per-TP-rank dropout
stream not saved, and the MFU peak measurement drawing from the restored global generator.
"""
import pytest

from megagpt.checkpoint.compare import first_difference

from test_layouts import legacy, legacy_data  # noqa: F401,F811  (legacy_data: the fixture)
from test_train_runs import launch, losses, ok

pytestmark = pytest.mark.slow

DROPOUT = {"embd_dropout": 0.1, "resid_dropout": 0.1, "attn_dropout": 0.1}
CASES = {   # name: (ds config, parallel section, model overrides)
    "zero0": ("zero0.json", {}, {}),
    "zero1_dropout": ("zero1.json", {}, DROPOUT),
    "zero2_dropout": ("zero2.json", {}, DROPOUT),
    "zero3": ("zero3.json", {}, {}),
    "tp2_sp_dropout": ("zero1.json", {"tensor_parallel": 2, "sequence_parallel": True}, DROPOUT),
    "pp2_dropout": ("zero1.json", {"pipeline_parallel": 2}, DROPOUT),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bit_exact(tmp_path, legacy_data, name):  # noqa: F811
    ds, par, model = CASES[name]
    cfg = legacy.config(tmp_path / "c.yaml", *legacy_data, model=model, parallel=par, train_iters=25,
                        save_interval=0, keep_last=0)
    fresh = ok(launch(cfg, ds, tmp_path / "straight", "--load", str(tmp_path / "straight")))
    assert f"no complete checkpoint in {tmp_path / 'straight'} (no such directory): starting from step 0" in fresh.stdout
    ok(launch(cfg, ds, tmp_path / "resumed", "--exit-interval", "5"))
    r = ok(launch(cfg, ds, tmp_path / "resumed", "--load", str(tmp_path / "resumed")))
    assert "resumed from" in r.stdout and "at step 5" in r.stdout
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(want) == list(range(1, 26)) and sorted(got) == sorted(want)
    assert [s for s in want if got[s] != want[s]] == [], (want, got)
    diff, compared = first_difference(tmp_path / "straight" / "global_step25", tmp_path / "resumed" / "global_step25")
    assert diff is None and compared > 10, diff
