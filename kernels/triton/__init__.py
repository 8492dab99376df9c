"""Fused Triton kernels: layer_norm.py, rms_norm.py, flash_attention.py, cross_entropy.py,
bias_gelu.py (each says why it exists). On CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``, read when triton is first imported; the tests switch it on in conftest.py).
"""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
