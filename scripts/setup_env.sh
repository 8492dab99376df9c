#!/usr/bin/env bash
# Install megagpt and its test dependencies into the current Python environment.
#
# Why the order matters: pip resolving a bare `torch` requirement on a machine without torch pulls
# a multi-GB CUDA build. So torch comes first: an already-installed torch is honoured (GPU boxes
# keep their CUDA build), otherwise the CPU wheel torch==2.13.0 is installed. DeepSpeed ships only
# an sdist whose setup.py imports torch, so everything else is built with --no-build-isolation
# against that torch (an isolated build env would download torch again).
#
# --cluster (opt-in, needs root and Debian's apt): also installs the system programs the cluster
# tests start for real: Slurm (slurmctld, slurmd), munge, sshd + pdsh (deepspeed --hostfile over
# ssh between network namespaces) and Open MPI. Without it those tests skip with a one-line reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--cluster" ]]; then
  CLUSTER_PKGS=(slurm-wlm munge openssh-server openssh-client pdsh openmpi-bin iproute2 procps)
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "[setup] --cluster: skipped (needs root and apt-get); the cluster tests will skip"
  elif command -v slurmctld >/dev/null && command -v sshd >/dev/null && command -v pdsh >/dev/null \
       && [[ -x /usr/bin/mpirun ]] && command -v munged >/dev/null; then
    echo "[setup] --cluster: system packages already installed"
  else
    echo "[setup] --cluster: apt-get install ${CLUSTER_PKGS[*]}"
    # a failed install must not stop the Python setup: the cluster tests then skip, saying what is missing
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${CLUSTER_PKGS[@]}" >/dev/null; }; then
      echo "[setup] --cluster: apt-get failed; the Slurm / two-node tests will skip"
    fi
  fi
fi

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing torch==2.13.0"
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet --upgrade setuptools wheel
echo "[setup] installing megagpt (editable) with test extras"
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
# DeepSpeed JIT-compiles its CPU ops (shared-memory comm, CPU Adam, fused Adam) on first use.
# On a fresh 2-core machine that takes minutes; do it here, once, so a first training run (or a
# test with a timeout) doesn't pay for it. Instant afterwards. The cache is per environment
# (torch's default, ~/.cache/torch_extensions/py311_cpu, is shared by every environment on the
# machine, which then rebuild each other's ops): megagpt/envsetup.py names the directory, and the
# entry points (pretrain, finetune, the launch CLI) default TORCH_EXTENSIONS_DIR to the same one.
TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$PY" megagpt/envsetup.py)}"
export TORCH_EXTENSIONS_DIR
echo "[setup] DeepSpeed ops cache: $TORCH_EXTENSIONS_DIR"
"$PY" - <<'PY'
import time
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
if acc.device_name() == "cpu":
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder"):
        builder, t = acc.create_op_builder(name), time.time()
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            print(f"[setup] DeepSpeed CPU op {builder.NAME} ready ({time.time() - t:.0f}s)", flush=True)
PY
"$PY" - <<'PY'
import importlib.util, torch, deepspeed, sentencepiece
print(f"[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, sentencepiece {sentencepiece.__version__}")
assert importlib.util.find_spec("megagpt_kernels"), "megagpt_kernels not importable"
PY
