"""The CUDA C++ LayerNorm, JIT-built by torch.utils.cpp_extension on first use on a GPU machine (no
compiled artifacts in the repo or wheel; torch caches the build). ``load()`` raises ``CudaKernelUnavailable``
with the reason (no CUDA, no nvcc, build error); dispatch catches it, warns once, and falls back.
"""
import os
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CU_SOURCE = HERE / "layer_norm_kernels.cu"
CPP_SOURCE = HERE / "layer_norm.cpp"
_ext = _error = None   # the built module, or why it cannot be built


class CudaKernelUnavailable(RuntimeError):
    pass


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def load():
    """Build (once per process; torch caches across processes) and return the extension module."""
    global _ext, _error
    if _ext is not None:
        return _ext
    if _error is not None:
        raise CudaKernelUnavailable(_error)
    try:
        if not torch.cuda.is_available():
            raise CudaKernelUnavailable("no CUDA device")
        nvcc = find_nvcc()
        if nvcc is None:
            raise CudaKernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        os.environ.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parents[1]))
        from torch.utils.cpp_extension import load as cpp_load
        _ext = cpp_load(name="megagpt_layer_norm_cuda", sources=[str(CPP_SOURCE), str(CU_SOURCE)],
                        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"], verbose=False)
        return _ext
    except Exception as e:  # a failed build must never break training: remember and report
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise CudaKernelUnavailable(_error) from e


class CudaLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ext = load()
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        w = weight.contiguous() if weight is not None else torch.ones(n, dtype=x.dtype, device=x.device)
        b = bias.contiguous() if bias is not None else torch.zeros(n, dtype=x.dtype, device=x.device)
        y, mean, rstd = ext.forward(x2, w.to(x.dtype), b.to(x.dtype), float(eps))
        ctx.save_for_backward(x2, w, b, mean, rstd)
        ctx.meta = (x.shape, weight is not None, bias is not None)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, b, mean, rstd = ctx.saved_tensors
        shape, has_w, has_b = ctx.meta
        dx, dw, db = load().backward(dy.reshape(x2.shape), x2, w.to(x2.dtype), b.to(x2.dtype), mean, rstd)
        return dx.view(shape), dw.to(w.dtype) if has_w else None, db.to(b.dtype) if has_b else None, None


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """Same signature as ``reference.layer_norm``; CUDA tensors of fp32/fp16/bf16 only."""
    return CudaLayerNormFn.apply(x, weight, bias, eps)
