"""Cluster launch helpers: hostfiles, Slurm node lists, per-node commands, MPI rank discovery.

Pure functions over strings and environment dicts so every launch path is testable without a
cluster; the sbatch templates in ``tools/slurm/`` call the CLI at the bottom
(``python -m megagpt.cluster.launch ...``). See ``docs/launch.md``.
"""
import argparse
import base64
import json
import os
import re
import shlex
import socket
import sys

from megagpt.atomic import write_text_atomic
from megagpt.envsetup import set_torch_extensions_dir
from megagpt.errors import MegaGPTError, cli_main

DEFAULT_MASTER_PORT = 29500
_HOST_RE = re.compile(r"[A-Za-z0-9_.\-]+")


# --- Slurm node lists -----------------------------------------------------------------------

def _split_top_level(nodelist):
    """Split ``a[1-2],b3`` on commas outside brackets (commas inside brackets separate ranges)."""
    depth = 0
    for ch in nodelist:
        depth += (ch == "[") - (ch == "]")
        if depth > 1:
            raise MegaGPTError(f"node list {nodelist!r}: nested '[' is not a valid Slurm node list")
        if depth < 0:
            raise MegaGPTError(f"node list {nodelist!r}: ']' without a matching '['")
    if depth != 0:
        raise MegaGPTError(f"node list {nodelist!r}: '[' without a matching ']'")
    return re.split(r",(?![^\[]*\])", nodelist)  # brackets are balanced and flat: inside iff ']' comes next


def _expand_ranges(body, nodelist):
    """``01-04,07`` -> ['01', '02', '03', '04', '07'], keeping the zero padding of the lower bound."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise MegaGPTError(f"node list {nodelist!r}: bad range {item!r} inside [...] "
                               "(expected N or N-M with digits)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise MegaGPTError(f"node list {nodelist!r}: range {item!r} goes backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))  # as Slurm pads
    return out


def _expand_one(name, nodelist):
    """Expand one top-level entry; several bracket groups give their cross product (``r[1-2]n[1-2]``)."""
    if not name:
        raise MegaGPTError(f"node list {nodelist!r}: empty host name (stray comma?)")
    hosts = [""]
    for text, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", name):
        if text and not _HOST_RE.fullmatch(text):
            raise MegaGPTError(f"node list {nodelist!r}: bad characters in host name part {text!r}")
        hosts = [h + text for h in hosts]
        if body:
            hosts = [h + r for h in hosts for r in _expand_ranges(body, nodelist)]
        elif body == "" and "[]" in name:
            raise MegaGPTError(f"node list {nodelist!r}: empty brackets '[]'")
    return hosts


def expand_nodelist(nodelist):
    """Expand a Slurm node list (``node[01-04,07]``, ``gpu-a[1-2],gpu-b3``, ``n[001-003]-ib``) as
    ``scontrol show hostnames`` does, so the templates need no Slurm client tools."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise MegaGPTError("node list is empty (is SLURM_JOB_NODELIST set?)")
    hosts = [h for part in _split_top_level(nodelist) for h in _expand_one(part, nodelist)]
    if len(set(hosts)) != len(hosts):
        raise MegaGPTError(f"node list {nodelist!r} names a host twice")
    return hosts


# --- hostfiles ------------------------------------------------------------------------------

def format_hostfile(hosts, slots):
    if slots < 1:
        raise MegaGPTError(f"slots per node must be >= 1, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def write_hostfile(path, hosts, slots):
    """Write atomically (temp name + rename): every node may write the same file concurrently."""
    write_text_atomic(path, format_hostfile(hosts, slots))
    return path


# --- Slurm job description ------------------------------------------------------------------

def _env_int(env, key, default=None):
    val = env.get(key)
    if not val:
        if default is None:
            raise MegaGPTError(f"environment variable {key} is not set (run inside a Slurm job)")
        return default
    m = re.match(r"\d+", val)  # SLURM_GPUS_ON_NODE is '8'; SLURM_JOB_GPUS-like forms start with digits
    if not m:
        raise MegaGPTError(f"environment variable {key}={val!r} is not an integer")
    return int(m.group(0))


def slurm_master_port(job_id):
    """A port derived from the job id (20000-29999): concurrent jobs on a node rarely collide,
    and a requeued job keeps its id, hence its port."""
    return 20000 + int(job_id) % 10000


def slurm_job(env, gpus_per_node=None):
    """What the templates need from SLURM_* variables: hosts, this node's rank, master addr/port."""
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    gpus = gpus_per_node or _env_int(env, "SLURM_GPUS_ON_NODE", 0) or _env_int(env, "SLURM_GPUS_PER_NODE", 0)
    if not gpus:
        raise MegaGPTError("GPUs per node unknown: set --gpus-per-node or #SBATCH --gpus-per-node=N")
    job_id = _env_int(env, "SLURM_JOB_ID")
    n_nodes = _env_int(env, "SLURM_NNODES", len(hosts))
    if n_nodes != len(hosts):   # two views of one allocation that disagree: a hand-set or stale variable
        raise MegaGPTError(f"SLURM_NNODES={n_nodes} but the node list names {len(hosts)} node(s)")
    return {
        "hosts": hosts,
        "num_nodes": len(hosts),
        "gpus_per_node": gpus,
        "node_rank": _env_int(env, "SLURM_NODEID", 0),
        "master_addr": env.get("MASTER_ADDR") or hosts[0],
        "master_port": int(env.get("MASTER_PORT") or slurm_master_port(job_id)),
        "job_id": job_id,
        "restart_count": _env_int(env, "SLURM_RESTART_COUNT", 0),
    }


def _check_node_rank(job):
    if not 0 <= job["node_rank"] < job["num_nodes"]:
        raise MegaGPTError(f"SLURM_NODEID={job['node_rank']} outside 0..{job['num_nodes'] - 1}")


def deepspeed_node_command(job, hostfile, script, script_args):
    """The per-node ``deepspeed --no_ssh`` launcher command (one srun task per node): each node
    starts only its own ranks; the hostfile still lists every node so ranks are numbered globally."""
    _check_node_rank(job)
    return ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(job["node_rank"]),
            "--num_nodes", str(job["num_nodes"]), "--num_gpus", str(job["gpus_per_node"]),
            "--master_addr", job["master_addr"], "--master_port", str(job["master_port"]),
            script, *script_args]


def node_launcher_command(job, script, script_args, python=sys.executable):
    """What ``deepspeed --no_ssh --node_rank R`` itself runs on a node (DeepSpeed 0.19.8
    ``launcher/runner.py``): its per-node launcher ``deepspeed.launcher.launch``.

    The templates run this directly because the ``deepspeed`` CLI process installs no SIGTERM
    handler in the no-ssh path: on preemption it dies at once, srun's task is over, and Slurm
    kills the rest of the step, trainers mid-checkpoint included. ``launch`` forwards SIGTERM to
    its ranks and waits for them (up to 30 s), staying the task's main process meanwhile.
    """
    _check_node_rank(job)
    world = {h: list(range(job["gpus_per_node"])) for h in job["hosts"]}
    world_info = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
    return [python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            f"--master_addr={job['master_addr']}", f"--master_port={job['master_port']}",
            f"--node_rank={job['node_rank']}", script, *script_args]


def srun_task_env(env):
    """torch.distributed env for one srun task per GPU (no launcher in between: signals from
    srun reach the trainer directly)."""
    hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
    rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
    if not 0 <= rank < world:   # a rank outside the world would wait for the rendezvous forever
        raise MegaGPTError(f"SLURM_PROCID={rank} outside 0..{world - 1} (SLURM_NTASKS={world})")
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(_env_int(env, "SLURM_LOCALID")),
        "LOCAL_WORLD_SIZE": str(_env_int(env, "SLURM_NTASKS_PER_NODE", 0)
                                or _env_int(env, "SLURM_TASKS_PER_NODE", 1)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": str(env.get("MASTER_PORT") or slurm_master_port(_env_int(env, "SLURM_JOB_ID"))),
    }


# --- MPI rank discovery ---------------------------------------------------------------------

_MPI_VARS = (  # (rank, size, local rank, local size) as set by each MPI
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),       # MPICH / Intel MPI (hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _mpi4py_master_addr():
    """Rank 0's address, broadcast over MPI (multi-node mpirun sets no MASTER_ADDR)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


def discover_dist_env(environ=None, default_port=DEFAULT_MASTER_PORT, master_addr_fn=_mpi4py_master_addr):
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from an MPI launcher's variables.

    Call before ``deepspeed.init_distributed`` so ``mpirun -np N python pretrain.py`` works.
    Does nothing when RANK and WORLD_SIZE are already set (deepspeed/torchrun launched us) or
    when no MPI variables are present (a plain single process). Returns the variables it set.
    Single-node jobs use 127.0.0.1; multi-node jobs broadcast rank 0's address via mpi4py.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    found = [names for names in _MPI_VARS if names[0] in env and names[1] in env]
    if not found:
        return {}
    rank_k, size_k, lrank_k, lsize_k = found[0]
    rank, size = _env_int(env, rank_k), _env_int(env, size_k)
    if lrank_k not in env:
        raise MegaGPTError(f"MPI launch: {rank_k} is set but {lrank_k} is not; cannot pick a local device")
    local_rank = _env_int(env, lrank_k, -1)
    local_size = _env_int(env, lsize_k, -1) if lsize_k in env else None
    if not 0 <= rank < size:
        raise MegaGPTError(f"MPI launch: {rank_k}={rank} outside 0..{size - 1}")
    out = {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank)}
    if local_size is not None:
        out["LOCAL_WORLD_SIZE"] = str(local_size)
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = "127.0.0.1" if local_size == size else master_addr_fn()
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(default_port)
    env.update(out)
    return out


# --- CLI used by tools/slurm/*.sbatch -------------------------------------------------------

def _default_hostfile(env):
    return os.path.join(env.get("TMPDIR") or "/tmp", f"megagpt-hostfile-{env.get('SLURM_JOB_ID', 'local')}")


def _build_parser():
    p = argparse.ArgumentParser(prog="python -m megagpt.cluster.launch", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand-nodelist", help="print one host per line")
    e.add_argument("nodelist", nargs="?", help="default: $SLURM_JOB_NODELIST")
    h = sub.add_parser("slurm-hostfile", help="write a DeepSpeed hostfile for this Slurm job")
    h.add_argument("--out", help="default: $TMPDIR/megagpt-hostfile-$SLURM_JOB_ID")
    h.add_argument("--gpus-per-node", type=int)
    for name, hlp in (("build-command", "print the per-node `deepspeed --no_ssh` command"),
                      ("exec-node", "exec DeepSpeed's per-node launcher (what that command runs)"),
                      ("exec-task", "set RANK/WORLD_SIZE/... from SLURM_* and exec python SCRIPT")):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("--hostfile")
        c.add_argument("--gpus-per-node", type=int)
        c.add_argument("script")
        c.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


@cli_main
def main(argv=None):
    args = _build_parser().parse_args(argv)
    set_torch_extensions_dir()  # the trainers it execs inherit this environment's op cache
    env = dict(os.environ)
    if args.cmd == "expand-nodelist":
        print("\n".join(expand_nodelist(args.nodelist or env.get("SLURM_JOB_NODELIST", ""))))
        return
    if args.cmd == "exec-task":
        env.update(srun_task_env(env))
        cmd = [sys.executable, "-u", args.script, *args.script_args]
        sys.stdout.flush()
        os.execvpe(cmd[0], cmd, env)
    job = slurm_job(env, args.gpus_per_node)
    hostfile = (args.out if args.cmd == "slurm-hostfile" else args.hostfile) or _default_hostfile(env)
    if args.cmd == "slurm-hostfile":
        print(write_hostfile(hostfile, job["hosts"], job["gpus_per_node"]))
        return
    if args.cmd == "build-command":
        print(shlex.join(deepspeed_node_command(job, hostfile, args.script, args.script_args)))
        return
    cmd = node_launcher_command(job, args.script, args.script_args)
    print(f"[megagpt.launch] node {job['node_rank']}/{job['num_nodes']} of {','.join(job['hosts'])}, "
          f"master {job['master_addr']}:{job['master_port']}: {shlex.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
