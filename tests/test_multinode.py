"""A real two-node cluster on one machine (tests/cluster_netns.py: two network namespaces, sshd in
each), and the real pretraining entry launched on it the ways a user does, from node 1:

  pdsh      ``deepspeed --hostfile`` (DeepSpeed's default runner: ssh pre-check, pdsh, per-node launcher)
  openmpi   ``deepspeed --hostfile --launcher openmpi`` (mpirun starts its daemons on node 2 over ssh)
  no_ssh    ``deepspeed --hostfile --no_ssh --node_rank R``, one launcher per node in its namespace
  kill      the pdsh job with the last rank (on node 2) SIGKILLed at step 3

4 gloo ranks, TP=2 inside a node, DP=2 across the nodes. Every launch's losses equal a 4-rank
``deepspeed --num_gpus 4`` run of the same config in the root namespace (the reference) to 1e-6.
Skipped with a reason when not root or ``ip netns``/sshd/pdsh are missing.
"""
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cluster_netns import skip_reason, two_node_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "megagpt/train/pretrain.py")
DS_CONFIG = str(REPO / "ds_configs/zero1.json")
STEPS = 6
APT_MPIRUN = "/usr/bin/mpirun"   # Open MPI from apt: its orted is on every node's default PATH


def config(path, data, debug=None, **train):
    prefix, tok = data
    cfg = {"model": {"preset": "tiny", "max_seq_len": 32},
           "data": {"data_path": [prefix], "tokenizer": tok, "split": "949,50,1", "seq_length": 32},
           "parallel": {"tensor_parallel": 2},
           "train": {"micro_batch_size": 2, "train_iters": STEPS, "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2,
                     "log_interval": 1, "eval_interval": 0, "save_interval": 0, "progress_bar": False,
                     "peak_tflops": 1.0,   # no peak-FLOP/s timing at start: MFU is not what these runs check
                     "deepspeed_config": DS_CONFIG, **train},
           "debug": debug or {}}
    Path(path).write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(save):
    lines = (Path(save) / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def output(r):
    return r.stdout[-4000:] + r.stderr[-4000:]


def assert_same_losses(got, want):
    assert sorted(got) == list(range(1, STEPS + 1)), got
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), (got, want)


@pytest.fixture(scope="module")
def data(shakespeare_prefix, sp_model):
    return shakespeare_prefix, sp_model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = skip_reason()
    if why:
        pytest.skip(why)
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The same job as 4 ranks on one node, root namespace: the losses every launch must match."""
    d = tmp_path_factory.mktemp("ref")
    cfg = config(d / "c.yaml", data)
    r = subprocess.run(["deepspeed", "--num_gpus", "4", "--master_port", str(_free_port()), PRETRAIN,
                        "--config", cfg, "--save", str(d / "save")],
                       cwd=d, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "dp=2 tp=2" in r.stdout, output(r)
    return losses(d / "save")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_dir(cluster, tmp_path, extra_env=()):
    """A launch directory (the launcher's cwd, on the filesystem both nodes share) holding the
    hostfile and the ``.deepspeed_env`` DeepSpeed forwards to the other node."""
    d = tmp_path / "job"
    d.mkdir()
    cluster.hostfile(d / "hostfile", slots=2)
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",   # the nodes' veth (same name on both)
           "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], **dict(extra_env)}
    (d / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return d


def trainers_per_node(cluster) -> list:
    """How many trainer processes (``python -u pretrain.py``, not the launchers whose command
    lines also name it, nor a trainer's short-lived forks) run in each node's namespace now."""
    counts = []
    for n in cluster.nodes:
        parents = {}
        for pid in n.pids():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if PRETRAIN in args[1:3]:
                parents[pid] = ppid
        counts.append(sum(ppid not in parents for ppid in parents.values()))
    return counts


class Watched:
    """Processes started on the nodes, sampled every 0.25 s until all exit (or ``timeout``):
    ``peak`` = the most trainers seen at once per node, ``samples`` = (seconds, counts)."""

    def __init__(self, cluster, cmds, cwd, env, timeout=240):
        self.t0 = time.monotonic()
        logs = [open(Path(cwd) / f"launcher{i}.log", "w+") for i in range(len(cmds))]
        procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                 for c, f in zip(cmds, logs)]
        self.samples = []
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() - self.t0 > timeout:
                    raise AssertionError(f"launch still running after {timeout} s")
                self.samples.append((time.monotonic() - self.t0, trainers_per_node(cluster)))
                time.sleep(0.25)
        finally:
            if any(p.poll() is None for p in procs):   # timed out (or interrupted): nothing may outlive the test
                for p in procs:
                    p.kill()
                cluster.kill_strays()
            for p in procs:
                p.wait()
        self.elapsed = time.monotonic() - self.t0
        self.returncodes = [p.returncode for p in procs]
        for f in logs:
            f.seek(0)
        self.out = [f.read() for f in logs]
        for f in logs:
            f.close()
        self.peak = [max((c[i] for _, c in self.samples), default=0) for i in range(len(cluster.nodes))]

    def tail(self):
        return "\n".join(o[-4000:] for o in self.out)


def launch_from_node1(cluster, d, *launcher_args, port, script_args=(), env=None, timeout=240):
    n1 = cluster.nodes[0]
    cmd = n1.exec("deepspeed", "--hostfile", "hostfile", "--master_addr", n1.addr, "--master_port", port,
                  *launcher_args, PRETRAIN, *script_args)
    return Watched(cluster, [cmd], d, env or cluster.env, timeout)


def assert_ran_on_both_nodes(w):
    assert w.returncodes == [0] * len(w.returncodes), w.tail()
    assert "dp=2 tp=2" in w.out[0], w.tail()
    assert w.peak == [2, 2], (w.peak, w.tail())   # 2 ranks per node, none of them on the wrong node


def assert_nothing_left(cluster, marker=None, wait_s=15):
    """No process but each node's sshd in either namespace, and no trainer with ``marker`` anywhere."""
    end = time.monotonic() + wait_s
    while True:
        strays = {n.name: n.strays() for n in cluster.nodes}
        trainers = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split() \
            if marker else []
        if not any(strays.values()) and not trainers:
            return
        if time.monotonic() > end:
            raise AssertionError(f"left behind: {strays}, trainers {trainers}")
        time.sleep(0.2)


def test_pdsh_over_ssh_matches_one_node(cluster, reference, data, tmp_path):
    d = job_dir(cluster, tmp_path)
    cfg = config(d / "c.yaml", data)
    w = launch_from_node1(cluster, d, port=29500, script_args=("--config", cfg, "--save", str(d / "save")))
    assert_ran_on_both_nodes(w)
    assert_same_losses(losses(d / "save"), reference)
    assert_nothing_left(cluster)


def mpi_bin(tmp_path):
    """A PATH dir whose ``mpirun``/``ompi_info`` are apt's Open MPI 4.1: DeepSpeed's OpenMPIRunner
    runs whichever ``mpirun`` comes first on PATH, and mpirun starts ``orted`` on the other node
    over ssh by bare name, so it must be one the remote shell finds (the pip wheel's is not)."""
    b = tmp_path / "mpibin"
    b.mkdir()
    for tool in ("mpirun", "ompi_info"):
        os.symlink(f"/usr/bin/{tool}", b / tool)
    return b


def test_openmpi_over_ssh_matches_one_node(cluster, reference, data, tmp_path):
    if not os.access(APT_MPIRUN, os.X_OK):
        pytest.skip(f"{APT_MPIRUN} missing (scripts/setup_env.sh --cluster installs openmpi-bin)")
    n1 = cluster.nodes[0]
    # OpenMPIRunner passes no MASTER_ADDR/PORT to the ranks: they travel in .deepspeed_env (-x)
    d = job_dir(cluster, tmp_path, {"MASTER_ADDR": n1.addr, "MASTER_PORT": "29501"})
    cfg = config(d / "c.yaml", data)
    env = dict(cluster.env, PATH=f"{cluster.bin}:{mpi_bin(tmp_path)}:{cluster.env['PATH']}")
    w = launch_from_node1(cluster, d, "--launcher", "openmpi", "--launcher_args",
                          "--allow-run-as-root --mca plm_rsh_agent ssh --mca oob_tcp_if_include eth0",
                          port=29501, script_args=("--config", cfg, "--save", str(d / "save")), env=env)
    assert_ran_on_both_nodes(w)
    assert_same_losses(losses(d / "save"), reference)
    assert_nothing_left(cluster)


def test_no_ssh_one_launcher_per_node_matches_one_node(cluster, reference, data, tmp_path):
    """What Slurm's srun does with the deepspeed template: each node starts its own launcher; the
    shared hostfile numbers the ranks (node 1: 0-1, node 2: 2-3). No ssh, no .deepspeed_env: each
    launcher's own environment reaches its ranks."""
    d = job_dir(cluster, tmp_path)
    cfg = config(d / "c.yaml", data)
    n1 = cluster.nodes[0]
    cmds = [n.exec("deepspeed", "--hostfile", "hostfile", "--no_ssh", "--node_rank", i, "--master_addr", n1.addr,
                   "--master_port", "29502", PRETRAIN, "--config", cfg, "--save", d / "save")
            for i, n in enumerate(cluster.nodes)]
    env = dict(cluster.env, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0")
    w = Watched(cluster, cmds, d, env)
    assert_ran_on_both_nodes(w)
    assert_same_losses(losses(d / "save"), reference)
    assert_nothing_left(cluster)


KILL_STEP = 3


def test_a_rank_killed_on_node2_ends_the_job_naming_node_and_rank(cluster, data, tmp_path):
    """Rank 3 (node 2, local rank 1) SIGKILLs itself as step 3 starts. The pdsh job must exit
    non-zero soon after, rank 0 naming rank 3 and node 2's address, with nothing left running."""
    marker = f"kill-{uuid.uuid4().hex}.yaml"   # in every trainer's command line
    d = job_dir(cluster, tmp_path)
    cfg = config(d / marker, data, {"kill_at_step": KILL_STEP}, distributed_timeout_minutes=0.25)
    w = launch_from_node1(cluster, d, port=29503, script_args=("--config", cfg, "--save", str(d / "save")),
                          timeout=180)
    assert w.peak == [2, 2], (w.peak, w.tail())
    full = next(i for i, (_, c) in enumerate(w.samples) if c[1] == 2)
    killed_at = next(t for t, c in w.samples[full:] if c[1] < 2)   # first sample without rank 3
    after_kill = w.elapsed - killed_at
    print(f"job exited {after_kill:.1f} s after the kill ({w.elapsed:.1f} s in all)")
    assert w.returncodes[0] != 0 and after_kill < 45, (w.returncodes, after_kill, w.tail())
    n2 = cluster.nodes[1]
    errors = [ln for ln in w.out[0].splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"rank 3 on node {socket.gethostname()} ({n2.addr}) stopped responding" \
        in errors[0] and f"at step {KILL_STEP}" in errors[0], (errors, w.tail())
    assert "Traceback" not in w.out[0], w.tail()
    assert_nothing_left(cluster, marker)


def test_the_cluster_is_gone_after_a_failure_inside_it(tmp_path):
    """The fixture's clean-up runs on failure too: processes in both namespaces are killed (sshd and
    a stray started in node 2), the namespaces and the veth pair are deleted."""
    why = skip_reason()
    if why:
        pytest.skip(why)
    seen = {}
    try:
        with pytest.raises(RuntimeError, match="planted"):
            with two_node_cluster(tmp_path / "c") as c:
                n2 = c.nodes[1]
                seen.update(names=[n.name for n in c.nodes], sshd=[n.sshd.pid for n in c.nodes], addr=n2.addr,
                            stray=subprocess.Popen(n2.exec("sleep", "600")))
                assert c.ssh(n2, "hostname").returncode == 0
                raise RuntimeError("planted failure")
        assert seen["stray"].wait(timeout=10) is not None
    finally:   # if the clean-up under test failed, do not leave its stray behind
        if "stray" in seen and seen["stray"].poll() is None:
            seen["stray"].kill()
            seen["stray"].wait()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in netns for name in seen["names"]), netns
    assert not any(Path(f"/proc/{pid}").exists() and "sshd" in Path(f"/proc/{pid}/cmdline").read_text()
                   for pid in seen["sshd"])
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert "mgv" + seen["names"][0].rsplit("-", 1)[1] not in links and seen["addr"] not in addrs
