"""Fused Triton kernels: layer_norm.py, rms_norm.py, flash_attention.py (each says why it exists).

``interpreted()`` runs them in Triton's CPU interpreter. Triton decides interpreter-vs-compiled
when a ``@triton.jit`` function is *defined*, so setting ``TRITON_INTERPRET=1`` after these modules
were imported has no effect; the context manager sets the env var and re-imports the kernel
modules, then restores both on exit, so interpreted tests cannot leak into other tests.
"""
import contextlib
import importlib
import os
import sys

KERNEL_MODULES = ("layer_norm", "rms_norm", "flash_attention")  # reload order: rms_norm uses layer_norm


def _reload_kernels() -> None:
    for name in KERNEL_MODULES:
        full = f"{__name__}.{name}"
        if full in sys.modules:
            importlib.reload(sys.modules[full])
        else:
            importlib.import_module(full)


@contextlib.contextmanager
def interpreted():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _reload_kernels()
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        _reload_kernels()
