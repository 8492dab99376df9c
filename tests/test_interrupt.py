"""Ctrl-C through the real pretraining entry, one plain python process (the SIGINT twin of
test_train_runs.py::test_sigterm_finishes_step_saves_and_exits_0; same code path as under a launcher,
1 rank): the first SIGINT finishes the step, saves it and exits 0 like SIGTERM; a relaunch resumes
from that checkpoint, and there a second SIGINT aborts at once without saving."""
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_runs import ENV, REPO, data, losses, make_config, n_lines  # noqa: F401  (data: the fixture)

pytestmark = pytest.mark.slow   # two real training processes, ~15 s

NOTE = "SIGINT: stopping after this step and saving (Ctrl-C again to abort without saving)"


def pretrain_until(cfg, save, lines, *extra):
    """Plain `python -m megagpt.train.pretrain` (zero0) with SIGINT as a shell's foreground job has it
    (the test runner may ignore SIGINT, which the child would inherit), once train_log.jsonl holds
    ``lines`` lines."""
    p = subprocess.Popen([sys.executable, "-m", "megagpt.train.pretrain", "--config", cfg, "--deepspeed_config",
                          str(REPO / "ds_configs/zero0.json"), "--save", str(save), *extra],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while n_lines(save) < lines and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    return p


def test_first_sigint_saves_the_step_and_exits_0_second_aborts(tmp_path, data):
    save = tmp_path / "ckpt"
    slow = {"step_delay_s": 1.0}   # every step sleeps first: the signals land mid-step
    cfg = make_config(tmp_path / "c.yaml", *data, train={"train_iters": 100000, "save_interval": 0,
                                                         "eval_interval": 0}, debug=slow)
    p = pretrain_until(cfg, save, 2)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in out + err, (p.returncode, out[-1500:] + err[-3000:])
    assert NOTE in err
    stopped = re.findall(r"^SIGINT: stopped after step (\d+), checkpoint saved$", out, re.M)
    assert len(stopped) == 1, out[-2000:]
    step = int(stopped[0])
    assert step == max(losses(save)) >= 2
    assert (save / "latest").read_text() == f"global_step{step}"
    assert (save / f"global_step{step}" / "complete").is_file()
    client = torch.load(save / f"global_step{step}" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == step

    # relaunch: resumes from that step; Ctrl-C twice aborts the usual way, saving nothing
    start = n_lines(save)
    p = pretrain_until(cfg, save, start + 1, "--load", str(save))
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert f"resumed from {save}/global_step{step} at step {step}" in out, out[-2000:]
    assert min(losses(save, start)) == step + 1
    assert p.returncode != 0 and NOTE in err and "KeyboardInterrupt" in err, (p.returncode, err[-3000:])
    assert "stopped after step" not in out
    assert (save / "latest").read_text() == f"global_step{step}"
    assert sorted(d.name for d in save.glob("global_step*")) == [f"global_step{step}"]
