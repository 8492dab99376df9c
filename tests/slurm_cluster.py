"""A real one-machine Slurm cluster for tests: Debian's Slurm 22.05 daemons, no systemd.

Topology: ONE node (this machine, named as ``slurmd -C`` reports, addressed as 127.0.0.1) with
the CPUs and memory ``slurmd -C`` reports, in one partition; a job runs as 2 tasks on that node
(the srun template: 2 srun tasks = 2 ranks; the deepspeed template: 1 srun task = DeepSpeed's
per-node launcher with 2 ranks). Everything lives in one temp dir:

- ``munged`` with a private key, socket, pid, seed and log file (the system munged, if any, is
  untouched); slurm.conf points at that socket (``AuthInfo=socket=...``);
- a minimal slurm.conf: private free ports, state/spool/pid/log files in the temp dir,
  proctrack/linuxproc + task/none (no cgroups, no systemd), select/cons_tres, no accounting,
  ``JobRequeue=1``, ``KillWait`` long enough for a checkpoint save, and ``cred_expire`` short
  (Slurm holds a requeued job back for the credential lifetime, 120 s by default: here 5 s);
- ``slurmctld -D`` and ``slurmd -D`` started in the foreground, so their pids are ours.

Clients get ``SLURM_CONF`` through :attr:`SlurmCluster.env`. :meth:`stop` cancels leftover jobs,
then kills by pid every process whose environment carries this cluster's ``SLURM_CONF`` (job
steps, slurmstepd) and the three daemons; it runs from the fixture's ``finally``.
"""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def _which(name):
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_reason():
    """Why this machine cannot run the cluster (one line), or None."""
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd runs jobs as the submitting user and spawns slurmstepd)"
    missing = [b for b in DAEMONS + CLIENTS + ("mungekey",) if not _which(b)]
    if missing:
        return f"Slurm/munge binaries not found: {', '.join(missing)} (install with scripts/setup_env.sh --cluster)"
    return None


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _first_job_id(n_jobs=8):
    """A first job id whose jobs' template master ports (20000 + id % 10000,
    megagpt.cluster.launch.slurm_master_port) are free here now: ids 1, 2, ... would always
    rendezvous on 20001, 20002, ... whatever else uses them."""
    for _ in range(50):
        first = random.randrange(1, 10000 - n_jobs)
        try:
            socks = []
            for i in range(n_jobs):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", 20000 + first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return 1


def _node_hardware():
    """``slurmd -C``'s NodeName line as a dict (CPUs, RealMemory, ...): what slurmd will register."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    return dict(kv.split("=", 1) for kv in line.split())


class SlurmCluster:
    def __init__(self, root, kill_wait=60, cred_expire=5):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.kill_wait, self.cred_expire = kill_wait, cred_expire
        self.procs = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env.pop("SLURM_JOB_ID", None)

    # --- start ----------------------------------------------------------------------------
    def _start_munge(self):
        d = self.root / "munge"
        d.mkdir(mode=0o711)   # clients need to reach the socket
        self.munge_socket = d / "munge.socket"
        key = d / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        # --force: the temp dir's parents (/tmp) are world-writable, which munged otherwise refuses
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")

    def _write_conf(self):
        hw = _node_hardware()
        self.node = hw["NodeName"]
        self.cpus = int(hw["CPUs"])
        ctld_port, slurmd_port = _free_ports(2)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=megagpt-test",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",   # the main loop starts a requeued job (default: every 60 s)
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobRequeue=1",
            f"FirstJobId={_first_job_id()}",
            f"KillWait={self.kill_wait}",
            "MinJobAge=600",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={hw['CPUs']} "
            f"Boards={hw['Boards']} SocketsPerBoard={hw['SocketsPerBoard']} CoresPerSocket={hw['CoresPerSocket']} "
            f"ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={hw['RealMemory']} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name, cmd):
        log = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait(self, cond, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: {', '.join(dead)} exited\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout} s\n{self.logs()}")

    def start(self, timeout=60):
        """Start munged, slurmctld, slurmd; return once sinfo shows the node idle (bounded)."""
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.node} not idle in sinfo")
        return self

    # --- clients --------------------------------------------------------------------------
    def run(self, *cmd, check=True, timeout=30):
        r = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def node_state(self):
        r = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    def sbatch(self, args, env, cwd):
        """Submit; returns the job id. ``env`` is the job's environment (sbatch exports it all)."""
        r = subprocess.run([_which("sbatch"), "--parsable", *args], env={**env, "SLURM_CONF": str(self.conf)},
                           cwd=cwd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id):
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def in_queue(self, job_id):
        return bool(self.run("squeue", "-h", "-j", str(job_id), "-o", "%i", check=False).strip())

    def wait_gone(self, job_id, timeout):
        """Poll squeue until the job has left it (completed, failed or cancelled), bounded."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.in_queue(job_id):
                return self.job(job_id)
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still in squeue after {timeout} s: {self.job(job_id)}")

    def logs(self, tail=3000):
        out = []
        for p in [self.root / f"{n}.out" for n in DAEMONS] + sorted((self.root / "log").glob("*.log")):
            if p.exists():
                out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # --- stop -----------------------------------------------------------------------------
    def _our_pids(self):
        """Pids of processes started under this cluster: their environment has our SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode()
        own = {os.getpid()} | {p.pid for p in self.procs.values()}
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in own:
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:
                continue
        return pids

    def stop(self):
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_which("scancel"), "--full", "-u", "root"], env=self.env, capture_output=True, timeout=20)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for pid in self._our_pids():   # slurmstepd and job processes that outlived their daemons
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
