"""Bad steps through the real pretraining entry (2 gloo ranks): a NaN loss in the last micro-batch
of an accumulation, a NaN gradient on one rank with a finite loss, and NaN under pipeline
parallelism are all skipped on every rank without touching the weights; a loss spike rolls the
run back to its last complete checkpoint and skips the spike's samples.

"No update" is read from the checkpoints: Adam's own step count (it advances only for a
parameter it updates) is 5 after 6 steps in every optimizer file of every rank and stage, and
the logged LR follows the schedule through the skipped step.
"""
import json
import math

import pytest
import torch
import yaml

from test_layouts import legacy, legacy_data  # noqa: F401  (legacy_data: the fixture)
from test_train_runs import launch, losses, ok

pytestmark = pytest.mark.slow

GA2 = {"micro_batch_size": 2, "gradient_accumulation_steps": 2}
CASES = {   # name: (ds config, parallel section, train overrides, debug hook)
    "zero0_accumulation_nan_loss": ("zero0.json", {}, GA2, {"inject_nan_at_step": 3}),
    "zero2_accumulation_nan_loss": ("zero2.json", {}, GA2, {"inject_nan_at_step": 3}),
    "zero0_nan_gradient_on_one_rank": ("zero0.json", {}, {}, {"nan_grad_at_step": 3}),
    "zero1_nan_gradient_on_one_rank": ("zero1.json", {}, {}, {"nan_grad_at_step": 3}),
    "pp2_nan_loss": ("zero1.json", {"pipeline_parallel": 2}, {}, {"inject_nan_at_step": 3}),
    # no clipping: no global norm that would spread the NaN to the other stage by itself
    "pp2_zero0_nan_gradient_on_one_stage": ("zero0.json", {"pipeline_parallel": 2}, {"clip_grad": 0.0},
                                            {"nan_grad_at_step": 3}),
}


def config(path, data, debug, parallel=None, **train):
    legacy.config(path, *data, parallel=parallel, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["debug"] = debug
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def adam_steps(tag_dir) -> set:
    """Every Adam step count in a tag: ZeRO >= 1 optimizer partitions, ZeRO-0 module-state optimizers
    (DeepSpeed's FusedAdam counts steps in one parameter per group and leaves the others at 0)."""
    steps = set()
    for f in tag_dir.glob("*optim_states.pt"):
        state = torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        steps |= {int(s["step"]) for s in state.values()}
    for f in tag_dir.glob("*mp_rank_*_model_states.pt"):
        opt = torch.load(f, weights_only=False).get("optimizer") or {}
        steps |= {int(s["step"]) for s in opt.get("state", {}).values()}
    return steps - {0}


def logged(save, key):
    return {j["step"]: j[key] for j in map(json.loads, (save / "train_log.jsonl").read_text().splitlines())
            if key in j}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_step_is_skipped_on_every_rank(tmp_path, legacy_data, name):  # noqa: F811
    from megagpt.checkpoint import load_model
    from megagpt.train.schedule import Schedule

    ds, par, train, debug = CASES[name]
    cfg = config(tmp_path / "c.yaml", legacy_data, debug, par, train_iters=6, save_interval=0, **train)
    save = tmp_path / "ckpt"
    r = ok(launch(cfg, ds, save))
    assert "step 3: non-finite loss or gradient" in r.stdout and "update skipped on every rank" in r.stdout
    ls = logged(save, "loss")
    assert all(math.isfinite(ls[s]) for s in ls if s != 3) and ("nan_grad_at_step" in debug) == math.isfinite(ls[3])
    assert adam_steps(save / "global_step6") == {5}, adam_steps(save / "global_step6")
    sched = Schedule.from_saved(torch.load(next((save / "global_step6").glob("*mp_rank_00_model_states.pt")),
                                           weights_only=False))
    lr = logged(save, "lr")
    assert all(abs(lr[s] - sched.at(s)) < 1e-12 for s in range(1, 7)), lr
    weights = load_model(save).model.state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_loss_spike_rolls_back_and_skips_its_samples(tmp_path, legacy_data):  # noqa: F811
    """Spike at step 7 (its loss x10); checkpoints every 4 steps: back to step 4, steps 5-6 replayed
    bit-identically on the same samples, step 7 onwards on the samples after the spike's."""
    train = dict(train_iters=9, save_interval=4, keep_last=0, spike_policy="rollback", spike_window=3,
                 spike_factor=1.5)
    cfg = config(tmp_path / "c.yaml", legacy_data, {"spike_at_step": 7, "sample_ids": True}, **train)
    save = tmp_path / "ckpt"
    r = ok(launch(cfg, "zero1.json", save))
    gbs = 8
    assert "step 7: loss spike" in r.stdout and "rolled back to step 4" in r.stdout, r.stdout[-3000:]
    assert f"skipping its samples {6 * gbs}..{7 * gbs - 1}" in r.stdout and "shk_text_document: documents" in r.stdout
    records = [json.loads(ln) for ln in (save / "train_log.jsonl").read_text().splitlines()]
    by_step = {}
    for rec in records:
        if "loss" in rec:
            by_step.setdefault(rec["step"], []).append(rec["loss"])
    assert by_step[5][0] == by_step[5][1] and by_step[6][0] == by_step[6][1]   # the replay is exact
    spike = float(r.stdout.split("step 7: loss spike (")[1].split(")")[0])
    assert spike > 1.5 * by_step[6][0] and by_step[7] == [pytest.approx(by_step[7][0])] and by_step[7][0] < spike / 5
    ids = {}
    for ln in (save / "samples_rank0.jsonl").read_text().splitlines() + \
            (save / "samples_rank1.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        ids.setdefault(rec["step"], set()).update(rec["ids"])
    assert ids[7] == set(range(6 * gbs, 8 * gbs))   # both attempts of step 7: the spike's samples, then the next
    assert ids[9] == set(range(9 * gbs, 10 * gbs))
    client = torch.load(save / "global_step9" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["rollbacks"] == 1 and [tuple(x) for x in client["skip_ranges"]] == [(6 * gbs, 7 * gbs)]

    cfg = config(tmp_path / "c0.yaml", legacy_data, {"spike_at_step": 7}, **{**train, "max_rollbacks": 0})
    r = launch(cfg, "zero1.json", tmp_path / "stop")
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "loss spike at step 7" in errors[0] \
        and "max_rollbacks=0" in errors[0], r.stdout[-2000:] + r.stderr[-2000:]
