"""Resume is bit-exact, through the real pretraining entry (`deepspeed` launcher, 2 gloo ranks):
a run stopped at step 5 (`--exit-interval 5`) and relaunched with the same command to step 25
logs every loss of the run that never stopped, and its final checkpoint holds the same tensors —
every weight, fp32 master, Adam moment and step counter of every rank's files — for ZeRO 0, 1,
2, 3, TP=2 + sequence parallelism and PP=2, with dropout on and off.

What it guards (each planted and seen failing): DeepSpeed's CPU Adam kernel keeping its beta
powers outside the checkpoint (``checkpoint.engine.resync_cpu_adam``), the per-TP-rank dropout
stream not saved, and the MFU peak measurement drawing from the restored global generator.
"""
import shutil

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


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, legacy_data):  # noqa: F811
    """(config, save dir) of a straight 6-step ZeRO-1 run, its one tag global_step6. Launched once: the
    LR-schedule test reads its log, the damaged-checkpoint test damages a copy of its tag."""
    d = tmp_path_factory.mktemp("six_steps")
    cfg = legacy.config(d / "c.yaml", *legacy_data, train_iters=6, save_interval=0, keep_last=0)
    ok(launch(cfg, "zero1.json", d / "straight"))
    return cfg, d / "straight"


def test_resume_with_a_longer_run_keeps_the_lr_schedule_unless_told(tmp_path, six_steps):
    """Resuming a 6-step run with --train-iters 8 says which schedule settings differ and keeps the
    checkpoint's schedule (steps 4-6 get exactly the 6-step run's LRs, then min_lr), also across a
    second resume; --override-lr-schedule switches to the new decay instead."""
    from megagpt.train.schedule import Schedule

    cfg, straight = six_steps
    want = {s: r for s, r in lrs(straight).items()}
    # the first leg (stop at step 3) is the same run for both: launched once, each continues a copy
    ok(launch(cfg, "zero1.json", tmp_path / "first", "--exit-interval", "3"))
    for name, extra in (("kept", []), ("override", ["--override-lr-schedule"])):
        save = tmp_path / name
        shutil.copytree(tmp_path / "first", save)
        r = ok(launch(cfg, "zero1.json", save, "--load", str(save), "--train-iters", "7", "--exit-interval", "5",
                      *extra))
        assert "LR schedule differs from the checkpoint's (decay_iters 6 -> 7)" in r.stdout, r.stdout[-2000:]
        r = ok(launch(cfg, "zero1.json", save, "--load", str(save), "--train-iters", "8", *extra))
        got = lrs(save)
        if name == "kept":
            assert "keeping the checkpoint's" in r.stdout and "decay_iters 6 -> 8" in r.stdout
            assert all(got[s] == want[s] for s in range(1, 7)), (got, want)
            assert got[7] == got[8] == Schedule.from_saved({"config": {"train": {
                "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 3, "train_iters": 6, "lr_decay_style": "cosine"}}}).at(6)
        else:
            assert "decay_iters 7 -> 8" in r.stdout and "using this run's" in r.stdout
            new = Schedule(3e-3, 3e-4, 3, 8, "cosine")
            # the logged lr of step s is the one the next step uses (the scheduler already stepped)
            assert abs(got[7] - new.at(7)) < 1e-12 and got[7] > 3e-4 and got[5] != want[5]


def lrs(save):
    import json

    return {j["step"]: j["lr"] for j in map(json.loads, (save / "train_log.jsonl").read_text().splitlines())
            if "lr" in j}


def test_a_damaged_checkpoint_is_one_line_not_a_traceback(tmp_path, six_steps):
    cfg, straight = six_steps
    save = tmp_path / "ckpt"
    shutil.copytree(straight, save)
    f = save / "global_step6" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])          # truncated on disk
    # caught by the manifest; the only tag: refused, never a silent restart from step 0
    # (then without the manifest, as a tag saved before manifests: DeepSpeed's load fails, one line too)
    for expect in ("damaged (mp_rank_00_model_states.pt has", "mp_rank_00_model_states.pt: cannot read"):
        r = launch(cfg, "zero1.json", save, "--load", str(save), "--train-iters", "8")
        assert r.returncode != 0
        errors = [line for line in r.stdout.splitlines() + r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "global_step6" in errors[0] and expect in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stdout + r.stderr and "resumed from" not in r.stdout
        assert (save / "global_step6").is_dir()
        (save / "global_step6" / "manifest.json").unlink(missing_ok=True)
