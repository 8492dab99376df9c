"""Two cluster nodes on one machine: network namespaces joined by a veth pair, sshd in each.

Multi-node launch paths (pdsh over ssh, mpirun over ssh, one ``--no_ssh`` launcher per node)
need hosts that reach each other by address and by ssh. Two network namespaces give exactly
that without VMs: each has its own ``eth0`` (the same name on both nodes, so one
``GLOO_SOCKET_IFNAME`` / Open MPI ``btl_tcp_if_include`` fits all), its own address and its own
sshd. Everything the nodes need is written under one temp dir: host keys, the client key, the
``authorized_keys`` sshd reads, an ssh client config naming the nodes, and an ``ssh`` wrapper
(first on the launcher's PATH) that adds ``-F <that config>`` — ssh reads ``~/.ssh/config`` from
the passwd home, not ``$HOME``, and the real ``/root/.ssh`` and ``/etc/ssh`` stay untouched.

``two_node_cluster()`` is a context manager; on exit (also on failure) it kills every process
left in either namespace, by pid, then deletes the namespaces (which deletes the veth pair).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_PREFIX = "10.213"   # 10.213.X.0/24, X picked among free ones


def skip_reason() -> str | None:
    """Why the cluster cannot be built here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "ssh", "ssh-keygen", "pdsh"):
        if not shutil.which(tool):
            return f"{tool} not installed (scripts/setup_env.sh --cluster installs it)"
    if not sshd_path():
        return "sshd not installed (scripts/setup_env.sh --cluster installs openssh-server)"
    if _run(["ip", "netns", "list"], check=False).returncode != 0:
        return "`ip netns` does not work here"
    return None


def sshd_path() -> str | None:
    for p in ("/usr/sbin/sshd", "/sbin/sshd"):
        if os.access(p, os.X_OK):
            return p   # sshd must be started by absolute path (it re-executes itself)
    return None


def _run(cmd, check=True, timeout=20, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r


@dataclass
class Node:
    name: str        # ssh host name (the ssh config maps it to addr) and namespace name
    addr: str
    sshd: subprocess.Popen | None = None

    def exec(self, *cmd) -> list:
        """``cmd`` run inside this node's network namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def pids(self) -> set[int]:
        r = _run(["ip", "netns", "pids", self.name], check=False)
        return {int(p) for p in r.stdout.split()}

    def strays(self) -> set[int]:
        """Processes in the namespace other than its sshd listener."""
        return self.pids() - ({self.sshd.pid} if self.sshd else set())


@dataclass
class Cluster:
    nodes: list
    dir: Path
    ssh_config: Path
    bin: Path               # holds the ssh wrapper; put first on PATH
    env: dict = field(default_factory=dict)   # os.environ with bin first on PATH

    def ssh(self, node: Node, *cmd, timeout=20):
        return _run(self.nodes[0].exec("ssh", "-F", self.ssh_config, node.name, *cmd), check=False,
                    timeout=timeout)

    def kill_strays(self):
        """SIGKILL what runs in the namespaces besides their sshd (after a launch that timed out)."""
        for n in self.nodes:
            for pid in n.strays():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def hostfile(self, path, slots: int, names=None) -> str:
        Path(path).write_text("".join(f"{h} slots={slots}\n" for h in (names or [n.name for n in self.nodes])))
        return str(path)


def _used_subnets() -> str:
    """Every IPv4 address and route on this machine, in any namespace (to avoid clashes)."""
    out = [_run(["ip", "-o", "-4", "addr"], check=False).stdout, _run(["ip", "-4", "route"], check=False).stdout]
    for ns in _run(["ip", "netns", "list"], check=False).stdout.split("\n"):
        if ns.split():
            name = ns.split()[0]
            out.append(_run(["ip", "-n", name, "-o", "-4", "addr"], check=False).stdout)
            out.append(_run(["ip", "-n", name, "-4", "route"], check=False).stdout)
    return "\n".join(out)


def _pick_subnet() -> str:
    used = _used_subnets()
    candidates = random.sample(range(100, 250), 30)   # bounded: 30 tries
    for x in candidates:
        net = f"{SUBNET_PREFIX}.{x}."
        if net not in used:
            return net
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X.0/24 subnet among {len(candidates)} tried")


def _keygen(path: Path):
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    return path.with_suffix(".pub").read_text().split()[:2]


def _write_sshd_config(node: Node, d: Path, authorized: Path) -> Path:
    cfg = d / f"sshd_{node.name}.conf"
    cfg.write_text(f"""ListenAddress {node.addr}
Port 22
HostKey {d}/host_{node.name}
PidFile {d}/sshd_{node.name}.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64:30:128
MaxSessions 64
LogLevel ERROR
""")
    return cfg


def _kill_all(node: Node, deadline_s=10.0):
    """SIGKILL every process in the namespace, by pid, until none is left (bounded)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = node.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def two_node_cluster(tmp: Path):
    """Yield a ``Cluster`` of two nodes (namespaces ``mg-n1-<id>``, ``mg-n2-<id>``) that ssh to each
    other as root with a key made here. Cleans up everything on exit, even on failure."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:6]
    net = _pick_subnet()
    nodes = [Node(f"mg-n{i}-{suffix}", f"{net}{i}") for i in (1, 2)]
    veths = [f"mgv{suffix}{c}" for c in "ab"]
    made_ns = []
    try:
        for n in nodes:
            _run(["ip", "netns", "add", n.name])
            made_ns.append(n)
        _run(["ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1]])
        for n, v in zip(nodes, veths):
            _run(["ip", "link", "set", v, "netns", n.name])
            _run(["ip", "-n", n.name, "link", "set", v, "name", "eth0"])
            _run(["ip", "-n", n.name, "addr", "add", f"{n.addr}/24", "dev", "eth0"])
            _run(["ip", "-n", n.name, "link", "set", "eth0", "up"])
            _run(["ip", "-n", n.name, "link", "set", "lo", "up"])

        client_key = tmp / "id_ed25519"
        pub = _keygen(client_key)
        authorized = tmp / "authorized_keys"
        authorized.write_text(" ".join(pub) + "\n")
        known = []
        for n in nodes:
            hk = _keygen(tmp / f"host_{n.name}")
            known.append(f"{n.name},{n.addr} {' '.join(hk)}\n")
        (tmp / "known_hosts").write_text("".join(known))
        ssh_config = tmp / "ssh_config"
        ssh_config.write_text("".join(f"Host {n.name}\n  HostName {n.addr}\n" for n in nodes) + f"""Host *
  User root
  IdentityFile {client_key}
  IdentitiesOnly yes
  UserKnownHostsFile {tmp}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
""")
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh_config} "$@"\n')
        wrapper.chmod(0o755)

        # sshd's privilege-separation dir, which the openssh-server unit makes at boot; left in place
        # afterwards: another session's sshd may be using it (removing it broke theirs)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for n in nodes:
            cfg = _write_sshd_config(n, tmp, authorized)
            log = open(tmp / f"sshd_{n.name}.log", "w")
            n.sshd = subprocess.Popen(n.exec(sshd_path(), "-D", "-e", "-f", cfg), stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
            log.close()
        cluster = Cluster(nodes, tmp, ssh_config, bin_dir,
                          dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}"))
        for n in nodes:   # sshd listening and reachable from node 1 (bounded: 50 x 0.2 s)
            for _ in range(50):
                r = cluster.ssh(n, "true", timeout=15)
                if r.returncode == 0:
                    break
                if n.sshd.poll() is not None:
                    raise RuntimeError(f"sshd on {n.name} exited: {(tmp / f'sshd_{n.name}.log').read_text()[-500:]}")
                time.sleep(0.2)
            else:
                raise RuntimeError(f"ssh to {n.name} ({n.addr}) from {nodes[0].name} fails: {r.stderr.strip()}")
        yield cluster
    finally:
        for n in made_ns:
            if n.sshd is not None:
                with contextlib.suppress(ProcessLookupError):
                    n.sshd.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.sshd.wait(timeout=5)
            _kill_all(n)
        for n in made_ns:
            _run(["ip", "netns", "del", n.name], check=False)
        for v in veths:   # gone with its namespace, unless setup failed before moving it
            if _run(["ip", "link", "show", v], check=False).returncode == 0:
                _run(["ip", "link", "del", v], check=False)
