"""Triton cross-entropy over a large vocab: per-row online log-sum-exp in vocab chunks.

Why: eager ``F.cross_entropy`` on (tokens, vocab) logits materialises an fp32 softmax/log-softmax
as large as the logits (for bf16 logits that is 2x their memory) and makes several passes. Here
each row streams its logits in BLOCK_V chunks keeping only a running max and sum in fp32: forward
stores one loss and one LSE per row; backward writes softmax - onehot straight into the gradient
(same dtype as the logits), scaled by dloss / n_valid read on-device (no host sync). Labels equal
to ``ignore_index`` contribute no loss and zero gradient; the mean is over the other rows.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_torch_dtype


@triton.jit
def _ce_fwd(X, LABELS, LOSS, LSE, V, stride, ignore_index, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    m = tl.full([BLOCK_V], -1e30, dtype=ACC)  # finite floor: no (-inf) - (-inf) for masked lanes
    s = tl.zeros([BLOCK_V], dtype=ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(X + row * stride + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    valid = label != ignore_index
    safe = tl.where(valid, label, 0).to(tl.int64)
    x_label = tl.load(X + row * stride + safe).to(ACC)
    tl.store(LOSS + row, tl.where(valid, lse - x_label, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd(X, DX, LABELS, LSE, DLOSS, NVALID, V, stride, ignore_index,
            ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    scale = tl.load(DLOSS).to(ACC) / tl.load(NVALID).to(ACC)
    scale = tl.where(label != ignore_index, scale, 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(ACC)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(DX + row * V + cols, g.to(DX.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), 4096)


class CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        shape = logits.shape
        x = logits.reshape(-1, shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = labels.reshape(-1).contiguous()
        n, v = x.shape
        acc = acc_torch_dtype(x.dtype)
        loss = torch.empty(n, dtype=acc, device=x.device)
        lse = torch.empty(n, dtype=acc, device=x.device)
        block = _block_v(v)
        _ce_fwd[(n,)](x, y, loss, lse, v, x.stride(0), ignore_index, ACC=acc_dtype(x.dtype), BLOCK_V=block,
                      num_warps=8 if block >= 2048 else 4)
        n_valid = (y != ignore_index).sum().clamp(min=1).to(acc)   # none valid: loss 0, not 0/0
        ctx.save_for_backward(x, y, lse, n_valid)
        ctx.ignore_index, ctx.shape = ignore_index, shape
        return (loss.sum() / n_valid).to(logits.dtype if logits.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, dloss):
        x, y, lse, n_valid = ctx.saved_tensors
        n, v = x.shape
        dx = torch.empty((n, v), dtype=x.dtype, device=x.device)
        block = _block_v(v)
        _ce_bwd[(n,)](x, dx, y, lse, dloss.reshape(1).contiguous(), n_valid, v, x.stride(0), ctx.ignore_index,
                      ACC=acc_dtype(x.dtype), BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
        return dx.view(ctx.shape), None, None


def cross_entropy(logits, labels, ignore_index: int = -100):
    """Same signature and semantics as ``megagpt_kernels.reference.cross_entropy`` (mean over valid)."""
    return CrossEntropyFn.apply(logits, labels, ignore_index)
