"""megagpt's kernels, imported as ``megagpt_kernels``: fused Triton/CUDA ops with PyTorch references.

The model only calls ``megagpt_kernels.dispatch``; see that module for how a backend is chosen.
"""
from . import dispatch, reference  # noqa: F401
from .dispatch import attention, layer_norm, rms_norm  # noqa: F401
