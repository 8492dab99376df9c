"""The sbatch templates under a real Slurm 22.05 (tests/slurm_cluster.py: one node, 2 ranks, gloo).

  reference   pretrain_deepspeed.sbatch (1 srun task = DeepSpeed's per-node launcher, 2 ranks) to
              completion: every step logged, loss falls
  interrupted pretrain_srun.sbatch (2 srun tasks = 2 ranks), one job: `scontrol requeue` after the
              first checkpoint, then `scancel --batch --signal=TERM` (the time-limit warning of
              `#SBATCH --signal=B:TERM@120`) after the rerun's first checkpoint; each time the
              trainers save, Slurm reruns the script, it resumes -> every logged loss bit-equal
              to the reference
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from slurm_cluster import SlurmCluster, missing_reason
from test_train_runs import make_config

REPO = Path(__file__).resolve().parents[1]
# 60 steps; the interrupted job sleeps STEP_DELAY_S before each step (debug.step_delay_s), so
# its signals land mid-run however fast the machine is: >= 5 s between a checkpoint and the end
ITERS, SAVE_EVERY, STEP_DELAY_S = 60, 10, 0.1
TRAIN = {"train_iters": ITERS, "log_interval": 20, "eval_interval": 0, "save_interval": SAVE_EVERY}


def test_skip_reasons(monkeypatch):
    """Without root or without the binaries the cluster tests skip with one line saying which."""
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    assert "needs root" in missing_reason()
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")   # daemons installed in /usr/sbin would still be found
    reason = missing_reason()
    assert reason.startswith("Slurm/munge binaries not found: ") and "\n" not in reason
    assert "sbatch, squeue, scontrol" in reason and reason.endswith("(install with scripts/setup_env.sh --cluster)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, shakespeare_prefix, sp_model):
    return make_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", shakespeare_prefix, sp_model, train=TRAIN)


@pytest.fixture(scope="module")
def slow_config(tmp_path_factory, shakespeare_prefix, sp_model):
    """The same run, each step delayed (the delay changes no number)."""
    return make_config(tmp_path_factory.mktemp("cfg") / "slow.yaml", shakespeare_prefix, sp_model, train=TRAIN,
                       debug={"step_delay_s": STEP_DELAY_S})


def job_env(cfg, ckpt, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_",
                                                                      "LOCAL_RANK"))}
    env.update({"CONFIG": cfg, "DS_CONFIG": str(REPO / "ds_configs" / "zero2.json"), "CKPT_DIR": str(ckpt),
                "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


# The templates ask for 8 GPUs per node and many CPUs; on this CPU box: 1 node, no GPUs (a gres
# request on a node without GPUs could never run), output into the test's temp dir.
SRUN_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
DS_ARGS = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=15"]


def submit(cluster, template, d, cfg, args, **extra):
    d.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch([*args, f"--output={d}/job-%j.out", str(REPO / "tools" / "slurm" / template)],
                          job_env(cfg, d / "ckpt", **extra), cwd=REPO)


def losses(ckpt):
    """{step: loss} from rank 0's train_log.jsonl; a step logged twice (rerun after a resume from
    an earlier checkpoint) keeps its last value."""
    rows = map(json.loads, (Path(ckpt) / "train_log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def job_output(d, job_id):
    return (d / f"job-{job_id}.out").read_text(errors="replace")


def finish(cluster, d, job_id, timeout=240):
    info = cluster.wait_gone(job_id, timeout)
    out = job_output(d, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out[-4000:]}"
    return info, out


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture(scope="module")
def reference(cluster, tiny_config, tmp_path_factory):
    """pretrain_deepspeed.sbatch, uninterrupted: 1 srun task = DeepSpeed's per-node launcher, 2 ranks."""
    d = tmp_path_factory.mktemp("ref")
    job = submit(cluster, "pretrain_deepspeed.sbatch", d, tiny_config, DS_ARGS, GPUS_PER_NODE="2")
    info, out = finish(cluster, d, job)
    return d / "ckpt", info, out


@pytest.mark.slow
def test_deepspeed_template_runs_to_completion(reference):
    ckpt, info, out = reference
    ls = losses(ckpt)
    assert sorted(ls) == list(range(1, ITERS + 1)), out[-3000:]
    assert sum(ls[s] for s in range(ITERS - 4, ITERS + 1)) / 5 < sum(ls[s] for s in range(1, 6)) / 5 - 0.5, ls
    assert (ckpt / "latest").read_text() == f"global_step{ITERS}"
    assert info["Restarts"] == "0" and "restart 0 on" in out and "SIGTERM" not in out
    assert "node 0/1 of" in out and "num_local_procs=2" in out and "dp=2" in out   # 1 launcher, 2 ranks


def saved_on_sigterm(out):
    """Steps at which the trainers stopped and saved on SIGTERM, in order."""
    return [int(ln.split("stopped after step ")[1].split(",")[0]) for ln in out.splitlines()
            if "SIGTERM: stopped after step" in ln and ln.rstrip().endswith("checkpoint saved")]


def complete(ckpt, step):
    return (ckpt / f"global_step{step}" / "complete").exists()


@pytest.mark.slow
def test_requeue_and_time_limit_signal_resume_bit_exact(cluster, slow_config, reference, tmp_path):
    """pretrain_srun.sbatch (2 srun tasks = 2 ranks), interrupted twice in one job:
    1. `scontrol requeue JOB` (an admin, or preemption with PreemptMode=REQUEUE): Slurm SIGTERMs
       every process of the job; the trainers save and exit, Slurm requeues the job;
    2. `scancel --batch --signal=TERM JOB`: what `#SBATCH --signal=B:TERM@120` sends 120 s before
       the time limit, to the batch shell only; requeue.sh's trap has Slurm SIGTERM the tasks,
       they save, the trap requeues the job.
    Each rerun resumes from the checkpoint saved on SIGTERM; every logged loss (fp32) is
    bit-equal to the uninterrupted reference run of the other template."""
    d = tmp_path / "job"
    ckpt = d / "ckpt"
    job = submit(cluster, "pretrain_srun.sbatch", d, slow_config, SRUN_ARGS)
    out = lambda: job_output(d, job) if (d / f"job-{job}.out").exists() else ""  # noqa: E731

    wait_for(lambda: complete(ckpt, SAVE_EVERY), 150, "no first checkpoint")
    cluster.run("scontrol", "requeue", job)
    wait_for(lambda: "restart 1 on" in out() and saved_on_sigterm(out()), 150, "no restart after scontrol requeue")
    first = saved_on_sigterm(out())[0]
    assert SAVE_EVERY <= first < ITERS, out()[-3000:]

    second_ckpt = (first // SAVE_EVERY + 1) * SAVE_EVERY   # the rerun's first periodic save
    wait_for(lambda: complete(ckpt, second_ckpt), 150, f"no checkpoint {second_ckpt} after the restart")
    cluster.run("scancel", "--batch", "--signal=TERM", job)
    info, text = finish(cluster, d, job)

    assert info["Restarts"] == "2", text[-3000:]
    saved = saved_on_sigterm(text)
    assert len(saved) == 2, f"trainers saved on SIGTERM at steps {saved}, expected 2 saves\n{text[-3000:]}"
    assert saved[0] == first and second_ckpt <= saved[1] < ITERS, text[-3000:]
    for step in saved:
        assert f"resumed from {ckpt}/global_step{step} at step {step}" in text, text[-3000:]
    # 1: Slurm ended the job and signalled the tasks itself; 2: the trap did, then requeued
    assert f"job {job} is " in text and "asking trainers to checkpoint and stop" in text, text[-3000:]
    assert text.count(f"requeueing job {job}") == 1 and "restart 2 on" in text
    assert losses(ckpt) == losses(reference[0])   # fp32, every step: bit-equal
