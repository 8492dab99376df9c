"""megagpt's kernels, imported as ``megagpt_kernels``: fused Triton/CUDA ops with PyTorch references.

The model only calls ``megagpt_kernels.dispatch``; see that module for how a backend is chosen.
Triton and CUDA modules are imported lazily by dispatch, so importing this package never needs them.
"""
from . import dispatch, reference  # noqa: F401
from .dispatch import attention, bias_gelu, cross_entropy, describe, layer_norm, rms_norm  # noqa: F401
