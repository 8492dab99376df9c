"""Triton fused bias + GELU (exact erf or tanh approximation), forward and backward.

Why: eager ``gelu(x @ W1 + b1)`` writes x+b, reads it back for GELU and saves both for backward. Here
the bias add and GELU are one pass (only x is kept), and the backward computes dx = dy * gelu'(x + b)
and the bias gradient in one pass (per-row-chunk fp32 partials reduced in a second stage, no atomics).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_torch_dtype, row_chunks, rows
from .layer_norm import reduce_partials

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)   # constexpr: compiled @triton.jit code refuses plain globals
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) in the accumulation dtype of z."""
    if TANH:
        u = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))  # tanh(u) = sign(u) (1 - e) / (1 + e): never overflows
        t = tl.where(u >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        y = 0.5 * z * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT_2))
        y = z * cdf
        dy = cdf + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return y, dy


@triton.jit
def _fwd(X, B, Y, M, N, HAS_B: tl.constexpr, TANH: tl.constexpr, ACC: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    z = tl.load(X + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_B:
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    y, _ = _gelu_and_grad(z, TANH)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(X, B, DY, DX, DB_PART, M, N, rows_per_prog, HAS_B: tl.constexpr, TANH: tl.constexpr,
         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    start = pid.to(tl.int64) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < end) & cmask[None, :]
        off = rows[:, None] * N + cols[None, :]
        z = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            z += b[None, :]
        _, g = _gelu_and_grad(z, TANH)
        dx = tl.load(DY + off, mask=mask, other=0.0).to(ACC) * g
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(tl.where(mask, dx, 0.0), axis=0)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db, mask=cmask)


class BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        x2 = rows(x)
        m, n = x2.shape
        y = torch.empty_like(x2)
        bm, bn = 16, min(triton.next_power_of_2(n), 256)
        _fwd[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, bias if bias is not None else x2, y, m, n, HAS_B=bias is not None, TANH=approximate == "tanh",
            ACC=acc_dtype(x.dtype), BLOCK_M=bm, BLOCK_N=bn)
        ctx.save_for_backward(x2, bias)
        ctx.tanh, ctx.shape = approximate == "tanh", x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        m, n = x2.shape
        dx = torch.empty_like(x2)
        g, per = row_chunks(m, x2.device)
        has_b = bias is not None
        part = torch.empty((g, n), dtype=acc_torch_dtype(x2.dtype), device=x2.device) if has_b else x2
        bm, bn = 16, min(triton.next_power_of_2(n), 256)
        _bwd[(g, triton.cdiv(n, bn))](x2, bias if has_b else x2, rows(dy), dx, part, m, n, per, HAS_B=has_b,
                                      TANH=ctx.tanh, ACC=acc_dtype(x2.dtype), BLOCK_M=bm, BLOCK_N=bn)
        db = reduce_partials(part, bias.dtype) if has_b and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), db, None


def bias_gelu(x, bias, approximate: str = "none"):
    """Same signature and semantics as ``megagpt_kernels.reference.bias_gelu``."""
    return BiasGeluFn.apply(x, bias, approximate)
