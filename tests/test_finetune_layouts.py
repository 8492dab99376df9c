"""Finetuning from pretraining checkpoints of other layouts, and at another layout itself, through
the CLI: `megagpt/finetune/run.py` starts from the TP=2 and the PP=2 DeepSpeed checkpoints of
tests/fixtures/legacy_v0, and a TP=2 finetuning run (2 gloo ranks under the `deepspeed`
launcher) follows the single-process TP=1 run from the same checkpoint: same per-epoch train and
eval loss (fp32 reduction-order tolerance), same predictions' accuracy.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_runs import REPO, free_port

LEGACY = REPO / "tests" / "fixtures" / "legacy_v0"
TOL = 5e-5


def finetune(out, init, *extra, ranks=1):
    args = ["--task", "rte", "--data-root", str(REPO.parent / "shared" / "data"), "--init", str(init),
            "--tokenizer", str(LEGACY / "tokenizer.model"), "--train-limit", "48", "--eval-limit", "32",
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--save", str(out), "--log-interval", "0",
            "--seed", "3", *extra]
    script = str(REPO / "megagpt" / "finetune" / "run.py")
    cmd = ([sys.executable, script] if ranks == 1 else
           ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads((out / "history.json").read_text())["history"]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("legacy")
    for name in ("ckpt_tp2", "ckpt_pp2"):
        shutil.copytree(LEGACY / name, d / name)
    return d


@pytest.mark.slow
def test_finetune_from_tp2_and_pp2_checkpoints_and_at_tp2(legacy, tmp_path):
    from megagpt.checkpoint.tokenizer_files import bundled_tokenizer
    from megagpt.finetune.checkpoint import load_finetuned

    serial = finetune(tmp_path / "tp2_init", legacy / "ckpt_tp2")
    from_pp = finetune(tmp_path / "pp2_init", legacy / "ckpt_pp2")
    at_tp2 = finetune(tmp_path / "tp2_run", legacy / "ckpt_tp2", "--tensor-parallel", "2", ranks=2)
    for h in (serial, from_pp, at_tp2):
        assert [e["epoch"] for e in h] == [1, 2] and all(0 <= e["accuracy"] <= 1 for e in h)
    assert from_pp[0]["train_loss"] != serial[0]["train_loss"]     # really another pretrained model
    for a, b in zip(at_tp2, serial):
        assert abs(a["train_loss"] - b["train_loss"]) < TOL and abs(a["eval_loss"] - b["eval_loss"]) < TOL, (a, b)
        assert a["accuracy"] == b["accuracy"], (a, b)
    # the TP=2 run's best/ holds the full (gathered) weights: the same tensors as the TP=1 run's
    sd_tp, info = load_finetuned(tmp_path / "tp2_run" / "best")
    sd_1, _ = load_finetuned(tmp_path / "tp2_init" / "best")
    assert sd_tp.keys() == sd_1.keys() and info["finetune_config"]["tensor_parallel"] == 2
    assert max((sd_tp[k] - sd_1[k]).abs().max().item() for k in sd_1) < 1e-4
    assert bundled_tokenizer(tmp_path / "tp2_run" / "best")
