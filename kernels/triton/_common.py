"""Helpers shared by the Triton kernels: dtype mapping and row flattening.

Kept tiny and free of ``@triton.jit`` so importing it never decides interpreter-vs-compiled mode.
"""
import functools

import torch
import triton
import triton.language as tl


def acc_dtype(t: torch.dtype):
    """fp32 accumulation for every half/float input; fp64 stays fp64 (so gradcheck can run)."""
    return tl.float64 if t == torch.float64 else tl.float32


def acc_torch_dtype(t: torch.dtype) -> torch.dtype:
    return torch.float64 if t == torch.float64 else torch.float32


def rows(x: torch.Tensor) -> torch.Tensor:
    """(…, N) -> contiguous (M, N) view/copy for row-wise kernels."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def row_chunks(m: int, device: torch.device):
    """(programs, rows per program) for a stage-1 weight-gradient reduction: a few programs per SM
    on a GPU, each over a contiguous chunk of the m rows (no program left without rows)."""
    g = max(1, min(m, 4 * _sm_count(device.index) if device.type == "cuda" else 4))
    per = triton.cdiv(m, g)
    return triton.cdiv(m, per), per


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.multi_processor_count


def warps_for(block: int) -> int:
    return max(1, min(16, block // 256))
