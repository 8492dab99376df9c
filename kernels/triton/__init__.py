"""Fused Triton kernels: layer_norm.py, rms_norm.py, flash_attention.py, cross_entropy.py,
bias_gelu.py (each says why it exists).

CPU testing goes through Triton's interpreter (``TRITON_INTERPRET=1``). Triton reads that variable
when a ``@triton.jit`` function is *defined* -- including the ``tl.sum``/``tl.max`` helpers inside
``triton`` itself -- so it only works if it is set before ``triton`` is first imported in the
process. ``interpreter_ready()`` tells a test whether this process can run the kernels on CPU,
setting the variable itself when triton has not been imported yet; otherwise a test must re-run
itself in a subprocess with the variable set (see tests/test_kernels_norms.py).
"""
import os
import sys


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return True
    if not interpreting():
        return False
    from triton.runtime.interpreter import InterpretedFunction
    from triton.language import standard
    return isinstance(standard.sum, InterpretedFunction)


def rerun_interpreted(test_file: str, timeout: float = 300):
    """Run one pytest file in a fresh process with TRITON_INTERPRET=1; returns (returncode, output)."""
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr
