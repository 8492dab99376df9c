"""Fused Triton RMSNorm, forward and backward.

Why: same single-pass structure as ``layer_norm.py`` (no mean, no bias): forward keeps only an fp32
rstd per row; backward writes dx and reduces dweight in two stages (per-program fp32 partials,
then a column sum), deterministic and atomic-free. Any hidden size (masked block),
fp16/bf16/fp32 with fp32 accumulation, fp64 for gradcheck. Output dtype follows x, like the
reference (which computes in fp32 and casts back).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_torch_dtype, num_row_programs, row_block, rows, warps_for
from .layer_norm import reduce_partials


@triton.jit
def _rms_fwd(X, Y, W, RSTD, N, eps, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(X, DY, DX, W, RSTD, DW_PART, M, N, rows_per_prog,
             HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, M - start)):
        row = start + i
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c1) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = rows(x)
        m, n = x2.shape
        block = row_block(n)
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=acc_torch_dtype(x.dtype), device=x.device)
        w = weight.contiguous() if weight is not None else x2
        _rms_fwd[(m,)](x2, y, w, rstd, n, eps, HAS_W=weight is not None, ACC=acc_dtype(x.dtype),
                       BLOCK=block, num_warps=warps_for(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dx = torch.empty_like(x2)
        g = num_row_programs(m, x2.device)
        per = triton.cdiv(m, g)
        g = triton.cdiv(m, per)
        has_w = weight is not None
        dw_part = torch.empty((g, n), dtype=acc_torch_dtype(x2.dtype), device=x2.device) if has_w else rstd
        block = row_block(n)
        _rms_bwd[(g,)](x2, rows(dy), dx, weight if has_w else x2, rstd, dw_part, m, n, per,
                       HAS_W=has_w, ACC=acc_dtype(x2.dtype), BLOCK=block, num_warps=warps_for(block))
        dw = reduce_partials(dw_part, weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x, weight, eps: float = 1e-6):
    """Same signature and semantics as ``megagpt_kernels.reference.rms_norm``."""
    return RMSNormFn.apply(x, weight, eps)
