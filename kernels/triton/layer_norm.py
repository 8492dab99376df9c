"""Fused Triton LayerNorm and RMSNorm (``RMS=True``: no centring, no bias), forward and backward.

Why: the eager LayerNorm reads/writes the activation several times (mean, var, normalise, affine;
backward recomputes the same). Here a row is read once per pass: forward writes y plus an fp32
mean/rstd per row; backward reads x, dy once, writes dx, and folds dweight/dbias into per-program
fp32 partial sums (stage 1) that a second tiny kernel sums over programs (stage 2), so no atomics
and a deterministic result. Any hidden size works (one power-of-two block, masked tail); inputs
may be fp16/bf16/fp32 (fp32 accumulation) or fp64 (fp64 accumulation, for gradcheck).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_torch_dtype, row_chunks, rows, warps_for


@triton.jit
def _norm_fwd(X, Y, W, B, MEAN, RSTD, N, eps, RMS: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd(X, DY, DX, W, MEAN, RSTD, DW_PART, DB_PART, M, N, rows_per_prog, RMS: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 1: dx for a contiguous chunk of rows; partial dweight/dbias of that chunk."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, tl.minimum(rows_per_prog, M - start)):
        row = start + i
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        wdy = dy * w if HAS_W else dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + tl.sum(wdy, axis=0) / N)) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


@triton.jit
def _sum_rows(PART, OUT, G, N, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 2: OUT[n] = sum_g PART[g, n] (column sums of the per-program partials)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        m = (g[:, None] < G) & (cols[None, :] < N)
        acc += tl.sum(tl.load(PART + g[:, None] * N + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cols < N)


def reduce_partials(part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    g, n = part.shape
    out = torch.empty(n, dtype=out_dtype, device=part.device)
    _sum_rows[(triton.cdiv(n, 64),)](part, out, g, n, ACC=acc_dtype(part.dtype), BLOCK_G=16, BLOCK_N=64)
    return out


class NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x2 = rows(x)
        m, n = x2.shape
        block = triton.next_power_of_2(n)
        acc = acc_torch_dtype(x.dtype)
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=acc, device=x.device)
        mean = rstd if rms else torch.empty(m, dtype=acc, device=x.device)
        w = weight.contiguous() if weight is not None else x2
        b = bias.contiguous() if bias is not None else x2
        _norm_fwd[(m,)](x2, y, w, b, mean, rstd, n, eps, RMS=rms, HAS_W=weight is not None,
                        HAS_B=bias is not None, ACC=acc_dtype(x.dtype), BLOCK=block, num_warps=warps_for(block))
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.shape, ctx.rms = x.shape, rms
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dx = torch.empty_like(x2)
        acc = acc_torch_dtype(x2.dtype)
        g, per = row_chunks(m, x2.device)
        has_w, has_b = weight is not None, bias is not None
        dw_part = torch.empty((g, n), dtype=acc, device=x2.device) if has_w else rstd
        db_part = torch.empty((g, n), dtype=acc, device=x2.device) if has_b else rstd
        block = triton.next_power_of_2(n)
        _norm_bwd[(g,)](x2, rows(dy), dx, weight if has_w else x2, mean, rstd, dw_part, db_part, m, n, per,
                        RMS=ctx.rms, HAS_W=has_w, HAS_B=has_b, ACC=acc_dtype(x2.dtype), BLOCK=block,
                        num_warps=warps_for(block))
        dw = reduce_partials(dw_part, weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        db = reduce_partials(db_part, bias.dtype) if has_b and ctx.needs_input_grad[2] else None
        return dx.view(ctx.shape), dw, db, None, None


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """Same signature and semantics as ``megagpt_kernels.reference.layer_norm``."""
    return NormFn.apply(x, weight, bias, eps, False)
