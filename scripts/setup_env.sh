#!/usr/bin/env bash
# Install megagpt and its test dependencies into the current Python environment.
#
# Why the order matters: pip resolving a bare `torch` requirement on a machine without torch pulls
# a multi-GB CUDA build. So torch comes first: an already-installed torch is honoured (GPU boxes
# keep their CUDA build), otherwise the CPU wheel torch==2.13.0 is installed. DeepSpeed ships only
# an sdist whose setup.py imports torch, so everything else is built with --no-build-isolation
# against that torch (an isolated build env would download torch again).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing torch==2.13.0"
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet --upgrade setuptools wheel
echo "[setup] installing megagpt (editable) with test extras"
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" - <<'PY'
import importlib.util, torch, deepspeed, sentencepiece
print(f"[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, sentencepiece {sentencepiece.__version__}")
assert importlib.util.find_spec("megagpt_kernels"), "megagpt_kernels not importable"
PY
