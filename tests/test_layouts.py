"""Layouts and history, through the real pretraining entry (the `deepspeed` launcher, gloo ranks):

  * tp=pp=1 pretraining is bit-identical to the code before the one-model redesign: commit
    098005b (the commit that wrote tests/fixtures/legacy_v0), taken from git history and run on
    this machine with the same config (dropout off — see below);
  * the same seed trains the same model at any layout: each layout starts from its own
    initialisation (no shared weights) and logs the serial run's losses within fp32
    reduction-order tolerance — DP=2, TP=2, TP=2 + sequence parallel, PP=2, and another
    micro-batch x accumulation split of the same global batch — and the same validation loss,
    also with ``data.eod_mask_loss`` (micro-batches of unequal token counts).
"""
import importlib.util
import json
import math
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from test_train_runs import REPO, launch, losses, ok

LEGACY = REPO / "tests" / "fixtures" / "legacy_v0"
_spec = importlib.util.spec_from_file_location("legacy_make", LEGACY / "make.py")
legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(legacy)

# The layouts differ only in the order of fp32 reductions (which Adam amplifies a little step by
# step). Measured over 10 steps (losses ~6.0 -> 5.5, 2026-12-02): max |gap| 9.5e-7 (TP=2,
# accumulation, DP=2, TP=2+SP), 1.43e-6 (PP=2), validation <= 5.4e-7; before the one-model redesign
# the layouts differed by up to 1.7e-2.
LAYOUT_TOL = 1e-5


@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory, shakespeare_txt):
    """tinyshakespeare preprocessed with the fixture tokenizer, as make.py did."""
    from megagpt.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("legacy") / "shk"
    tok = str(LEGACY / "tokenizer.model")
    preprocess([str(shakespeare_txt)], str(out), tok, split_paragraphs=True, workers=1)
    return str(out) + "_text_document", tok


# With dropout on, runs intentionally differ from 098005b (expected.pt's "serial_dropout"): the old
# entry measured the MFU peak with 2 x 1024^2 normals drawn from the training generator, after a
# resume had restored it (so resumes were not exact); the peak now uses a private generator, which
# shifts every later dropout mask. tests/test_resume.py covers dropout-on runs.
def old_checkout(dest):
    """The fixture's commit (MANIFEST.json) extracted from git history into ``dest``; None without history."""
    commit = json.loads((LEGACY / "MANIFEST.json").read_text())["made_by_commit"]
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(dest) + ".tar", commit],
                       capture_output=True, text=True)
    if r.returncode:
        return None
    with tarfile.open(str(dest) + ".tar") as t:
        t.extractall(dest, filter="data")
    return dest


@pytest.mark.slow
def test_serial_losses_are_bit_identical_to_the_pre_redesign_code(tmp_path, legacy_data):
    """Bit for bit against the old code run here, not against the recorded losses: fp32 matmuls
    give different last bits on different CPU models (the fixture's machine and an Intel Xeon with
    AMX differ by ~1e-7 after 12 steps), so only the same machine can hold two codes to the same bits.
    The recorded losses still bound both runs, to CPU-kernel noise."""
    cfg = legacy.config(tmp_path / "c.yaml", *legacy_data)
    got = legacy.launch(cfg, "zero2.json", tmp_path / "ckpt", OLD=REPO)
    recorded = torch.load(LEGACY / "expected.pt")["losses"]["serial"]
    assert sorted(got) == list(range(1, 13))
    assert all(abs(got[s] - recorded[s]) < 1e-5 for s in got), {s: (got[s], recorded[s]) for s in got}
    old = old_checkout(tmp_path / "old")
    if old is None:   # a clone without history: the recorded losses, which hold on their machine only
        assert got == recorded, {s: (got[s], recorded[s]) for s in got if got[s] != recorded[s]}
        return
    want = legacy.launch(cfg, "zero2.json", tmp_path / "old_ckpt", OLD=old)
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}


# name: (ranks, parallel section, micro_batch_size, gradient_accumulation_steps, data.eod_mask_loss).
# With eod_mask_loss the micro-batches count different numbers of tokens (the shards are split by
# paragraph: ~1 end-of-document per sample), so a layout matches the serial run only if a step's
# loss weighs every counted token of the global batch alike (loop.token_weights; without it the
# gap is ~1e-3).
LAYOUTS = {
    "serial": (1, {}, 8, 1, False),
    "tp2": (2, {"tensor_parallel": 2}, 8, 1, False),
    "serial_eod": (1, {}, 8, 1, True),
    "accumulation_eod": (1, {}, 4, 2, True),
    "dp2_eod": (2, {}, 4, 1, True),
    "tp2_sp_eod": (2, {"tensor_parallel": 2, "sequence_parallel": True}, 8, 1, True),
    "pp2_eod": (2, {"pipeline_parallel": 2}, 4, 2, True),
}


@pytest.fixture(scope="module")
def layout_losses(tmp_path_factory, legacy_data):
    out = {}
    for name, (ranks, par, mbs, ga, eod) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        assert mbs * ga * ranks // (par.get("tensor_parallel", 1) * par.get("pipeline_parallel", 1)) == 8
        cfg = legacy.config(d / "c.yaml", *legacy_data, parallel=par, train_iters=10, save_interval=0,
                            micro_batch_size=mbs, gradient_accumulation_steps=ga, eval_interval=5,
                            eval_iters=2)   # 2 global batches of 8: the same 16 validation samples everywhere
        if eod:
            raw = yaml.safe_load(open(cfg))
            raw["data"]["eod_mask_loss"] = True
            Path(cfg).write_text(yaml.safe_dump(raw))
        ok(launch(cfg, "zero1.json", d / "ckpt", ranks=ranks))
        out[name] = losses(d / "ckpt"), val_losses(d / "ckpt")
    return out


def val_losses(save):
    return {j["step"]: j["val_loss"] for j in map(json.loads, (save / "train_log.jsonl").read_text().splitlines())
            if "val_loss" in j}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("serial")])
def test_every_layout_logs_the_serial_losses(layout_losses, name):
    """Training losses at every step, and the validation loss (over the same tokens) at steps 5, 10."""
    (serial, serial_val), (got, got_val) = layout_losses["serial_eod" if name.endswith("_eod") else "serial"], \
        layout_losses[name]
    assert sorted(got_val) == sorted(serial_val) == [5, 10]
    assert sorted(got) == sorted(serial) == list(range(1, 11))
    gap, val_gap = (max(abs(a[s] - b[s]) for s in b) for a, b in ((got, serial), (got_val, serial_val)))
    print(f"{name}: max |loss gap| {gap:.3g} over 10 steps, validation {val_gap:.3g}")   # docs/parallelism.md
    assert val_gap <= LAYOUT_TOL, (name, got_val, serial_val)
    assert all(math.isfinite(v) for v in got.values())
    assert gap <= LAYOUT_TOL, (name, gap, got, serial)
    assert serial[10] < serial[1] - 0.1          # it is training, not a flat line
