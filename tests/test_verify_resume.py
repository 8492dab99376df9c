"""tools/verify_resume.py, the user's own check of resume exactness: it passes on a real TP=2 run
(and reports the gap to the serial layout), and the comparison it relies on names the first
tensor that differs between two checkpoints."""
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megagpt.checkpoint.compare import first_difference
from test_layouts import LEGACY, legacy, legacy_data  # noqa: F401,F811  (legacy_data: the fixture)
from test_train_runs import ENV, REPO, free_port


@pytest.mark.slow
def test_verify_resume_passes_on_a_tp2_run(tmp_path, legacy_data):  # noqa: F811
    cfg = legacy.config(tmp_path / "c.yaml", *legacy_data, parallel={"tensor_parallel": 2})
    r = subprocess.run([sys.executable, str(REPO / "tools" / "verify_resume.py"), "--config", cfg,
                        "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"),
                        "--launcher", f"deepspeed --num_gpus 2 --master_port {free_port()}",
                        "--steps", "8", "--resume-at", "3", "--serial-reference", "--work", str(tmp_path / "w")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "losses: 8 of 8 steps identical" in r.stdout and "RESUME IS BIT-EXACT" in r.stdout
    assert re.search(r"checkpoint global_step8: identical \(\d+ tensors\)", r.stdout)
    gap = float(re.search(r"max \|loss gap\| over 8 steps (\S+)", r.stdout).group(1))
    assert gap < 1e-5


def test_first_difference_names_the_tensor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(LEGACY / "ckpt_serial" / "global_step12", a)
    shutil.copytree(LEGACY / "ckpt_serial" / "global_step12", b)
    diff, n = first_difference(a, b)
    assert diff is None and n > 10
    f = b / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sd = torch.load(f, weights_only=False)
    moment = sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg"]
    moment.view(-1)[7] += 1e-7                     # one element, one ulp-ish
    torch.save(sd, f)
    diff, _ = first_difference(a, b)
    assert diff.startswith(f"{f.name} ") and "exp_avg" in diff and "1 of" in diff, diff


def test_a_launcher_that_does_not_exist_is_one_line_before_any_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "verify_resume.py"), "--config", "c.yaml",
                        "--deepspeed_config", "ds.json", "--launcher", "nosuchlauncher --num_gpus 2",
                        "--work", str(tmp_path / "w")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("error: --launcher 'nosuchlauncher --num_gpus 2': "
                                                      "nosuchlauncher: command not found"), r.stderr
    assert not (tmp_path / "w").exists()
