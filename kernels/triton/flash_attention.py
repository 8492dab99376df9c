"""Triton causal/non-causal flash attention, forward and backward, with GQA/MQA and KV-cache masks.

Why: eager attention materialises the (T, T) score matrix per head (O(T^2) memory and traffic).
Here each program streams K/V blocks past a Q block with an online softmax (running max + sum in
fp32, base-2 exponentials), so only O(T) extra memory is kept: the output and one log-sum-exp per
query row. Backward recomputes P from that LSE: one kernel per K/V block accumulates dK/dV (and
loops over the q-heads sharing that K/V head, so GQA needs no repeat_interleave copy and no
atomics), another per Q block accumulates dQ.

Layouts: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), Hq % Hkv == 0, any strides with unit last-dim stride.
Causal masking is bottom-right aligned like ``reference.attention``: query i sits at position
Tk - Tq + i (the KV-cache case); Tq > Tk with causal=True is not supported here (dispatch routes
it to the reference). Head dims 16/32/64/128; any Tq/Tk (masked tails); fp16/bf16/fp32 (fp32
uses IEEE dots, not TF32, to stay an exact fp32 op) and fp64 (for gradcheck). No dropout.

Document mask (packed samples, ``doc_ids`` (B, Tk) int, causal only): a query also needs the key's
document id to equal its own. The wrapper adds, per key, the first and last index holding its id
(``_doc_table``), so a query block starts at its earliest document's first key and a key block stops
at its latest document's last query: the work follows the documents' lengths, not T. Visited blocks
all take the masked path (DOC is a constexpr, so the plain kernels compile exactly as before), and
the online softmax subtracts 0 instead of a running max of -inf (a row may see no key in a block).
"""
import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_torch_dtype

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def unsupported_reason(q, k, v, causal: bool, dropout_p: float, doc_ids=None):
    """None if this kernel handles the call, else a short reason (dispatch logs it)."""
    if doc_ids is not None:
        if not causal:
            return "a document mask without causal masking"
        if doc_ids.dim() != 2 or tuple(doc_ids.shape) != (q.shape[0], k.shape[2]) or doc_ids.is_floating_point():
            return f"doc_ids of shape {tuple(doc_ids.shape)}, not integer (B, Tk)"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p} > 0 (kernel is dropout-free)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "expects 4-D (B, H, T, D) tensors"
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        return f"head dim {d} not in {SUPPORTED_HEAD_DIMS}"
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        return f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}"
    if causal and q.shape[2] > k.shape[2]:
        return f"causal with Tq={q.shape[2]} > Tk={k.shape[2]}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return "q/k/v dtypes differ"
    return None


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with ACC accumulation. UPCAST (interpreter + bf16 only): triton 3.9's CPU interpreter
    multiplies bf16 bit patterns as integers, so feed it the exactly-equal fp32 values instead."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, lo, hi, offs_m, offs_n, offs_d, shift, TK,
               qk_scale, doc_base, doc_q, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi). MASK=False: blocks known to be fully visible
    (no causal cut, no key tail), so the compare/select work is skipped."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None], mask=cols[None, :] < TK, other=0.0)
            vb = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=cols[:, None] < TK, other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None])
            vb = tl.load(v_base + cols[:, None] * svt + offs_d[None, :])
        s = _dot(q, kt, ACC, PREC, UPCAST) * qk_scale
        if MASK:
            valid = cols[None, :] < TK
            if CAUSAL:
                valid = valid & (cols[None, :] <= shift + offs_m[:, None])
            if DOC:
                doc_k = tl.load(doc_base + cols, mask=cols < TK, other=-1)
                valid = valid & (doc_q[:, None] == doc_k[None, :])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if DOC:   # a row that has seen no key yet: subtract 0, not -inf (exp2(-inf - -inf) is NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, ACC, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _q_block(pid_m, bh, H, GROUP, TQ, TK, CAUSAL: tl.constexpr, DOC: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Batch, q head, kv head, rows and causal shift of query block ``pid_m``; keys in [0, full_hi) are
    visible to every row (no mask), those in [full_hi, hi) need the causal / key-tail / document mask."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    shift = TK - TQ  # bottom-right aligned causal mask: query i is at key position shift + i
    if CAUSAL:  # keys < shift + first row + 1 are visible to every row of this block
        full_hi = (shift + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(TK, shift + (pid_m + 1) * BLOCK_M)
    else:
        full_hi = TK // BLOCK_N * BLOCK_N
        hi = TK
    if DOC:
        full_hi = 0
    return b, h, h // GROUP, offs_m, shift, full_hi, hi


@triton.jit
def _doc_first_block(doc_base, shift, offs_m, TQ, TK, BLOCK_N: tl.constexpr):
    """First key block any row of this query block can see: the earliest first index of the rows'
    documents (row 1 of the (3, Tk) table), rounded down to a block."""
    first = tl.load(doc_base + TK + shift + offs_m, mask=offs_m < TQ, other=TK)
    return tl.min(first, axis=0) // BLOCK_N * BLOCK_N


@triton.jit
def _fwd(Q, K, V, O, LSE, DOCS, qk_scale,
         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdocb,
         H, TQ, TK, GROUP,
         CAUSAL: tl.constexpr, DOC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(1)
    b, h, hk, offs_m, shift, full_hi, hi = _q_block(tl.program_id(0), bh, H, GROUP, TQ, TK, CAUSAL, DOC,
                                                    BLOCK_M, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=offs_m[:, None] < TQ, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, D], dtype=ACC)
    doc_base = DOCS + b * sdocb
    doc_q = offs_m
    mask_lo = full_hi
    if DOC:
        doc_q = tl.load(doc_base + shift + offs_m, mask=offs_m < TQ, other=-2)
        mask_lo = _doc_first_block(doc_base, shift, offs_m, TQ, TK, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, 0, full_hi, offs_m, offs_n,
                               offs_d, shift, TK, qk_scale, doc_base, doc_q, False, CAUSAL, DOC, ACC, PREC, UPCAST,
                               BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, mask_lo, hi, offs_m, offs_n,
                               offs_d, shift, TK, qk_scale, doc_base, doc_q, True, CAUSAL, DOC, ACC, PREC, UPCAST,
                               BLOCK_N)
    row_ok = offs_m < TQ
    if DOC:   # padded tail rows match no document (l = 0); every real row sees at least itself
        l_i = tl.where(row_ok, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * TQ + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, TQ,
               ACC: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = offs_m[:, None] < TQ
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, sqt, sdt, lo, hi, offs_n, offs_m,
                offs_d, shift, TQ, qk_scale, doc_base, doc_k, MASK: tl.constexpr, DOC: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK/dV of one key block over query blocks [lo, hi). Tails need no score mask:
    padded query rows have q = dO = lse = delta = 0 and padded keys are never stored, so both add
    exactly zero; MASK=True applies the causal cut (diagonal blocks only)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rmask = rows < TQ
        qt = tl.load(q_base + rows[None, :] * sqt + offs_d[:, None], mask=rmask[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * sdt + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
        pt = tl.exp2(_dot(k, qt, ACC, PREC, UPCAST) * qk_scale - lse[None, :])  # P^T: (BLOCK_N, BLOCK_M)
        if MASK:
            seen = offs_n[:, None] <= shift + rows[None, :]
            if DOC:
                doc_q = tl.load(doc_base + shift + rows, mask=rmask, other=-2)
                seen = seen & (doc_k[:, None] == doc_q[None, :])
            pt = tl.where(seen, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, ACC, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), ACC, PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), ACC, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DOCS, qk_scale, sm_scale,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
              sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sdocb,
              H, HKV, TQ, TK, GROUP,
              CAUSAL: tl.constexpr, DOC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """One program per (K/V block, kv head): loops over every q head of its group and every q block."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    kmask = offs_n[:, None] < TK
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, D], dtype=ACC)
    shift = TK - TQ
    if CAUSAL:
        # queries before (first key - shift) never see this block; from (last key - shift) on, all keys
        lo = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, TQ)
    else:
        lo = 0
        full_lo = 0
    doc_base = DOCS + b * sdocb
    doc_k = offs_n
    mask_hi = full_lo
    if DOC:   # masked path only (causal-only with a document mask), up to the last query of the block's documents
        doc_k = tl.load(doc_base + offs_n, mask=offs_n < TK, other=-1)
        last = tl.load(doc_base + 2 * TK + offs_n, mask=offs_n < TK, other=-1)
        mask_hi = tl.minimum(tl.max(last, axis=0) - shift + 1, TQ)
        full_lo = TQ
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row_base = (b * H + h) * TQ
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, sqt, sdt, lo, mask_hi,
                             offs_n, offs_m, offs_d, shift, TQ, qk_scale, doc_base, doc_k, True, DOC, ACC, PREC,
                             UPCAST, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, sqt, sdt, full_lo, TQ,
                             offs_n, offs_m, offs_d, shift, TQ, qk_scale, doc_base, doc_k, False, DOC, ACC, PREC,
                             UPCAST, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, lo, hi, offs_m, offs_n, offs_d, shift, TK,
              qk_scale, doc_base, doc_q, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi). MASK=True (diagonal and key-tail
    blocks only) zeroes P where the causal cut or the key tail hides it: a padded key's score 0 minus
    a very negative LSE could overflow exp2, so tails are masked rather than relied on to be zero."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cmask = cols[None, :] < TK
        kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None], mask=cmask, other=0.0)
        vt = tl.load(v_base + cols[None, :] * svt + offs_d[:, None], mask=cmask, other=0.0)
        p = tl.exp2(_dot(q, kt, ACC, PREC, UPCAST) * qk_scale - lse[:, None])
        if MASK:
            valid = cmask
            if CAUSAL:
                valid = valid & (cols[None, :] <= shift + offs_m[:, None])
            if DOC:
                doc_k = tl.load(doc_base + cols, mask=cols < TK, other=-1)
                valid = valid & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vt, ACC, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), ACC, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DOCS, qk_scale, sm_scale,
            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sdqb, sdqh, sdqt, sdocb,
            H, TQ, TK, GROUP,
            CAUSAL: tl.constexpr, DOC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(1)
    b, h, hk, offs_m, shift, full_hi, hi = _q_block(tl.program_id(0), bh, H, GROUP, TQ, TK, CAUSAL, DOC,
                                                    BLOCK_M, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rmask = offs_m < TQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * TQ + offs_m, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * TQ + offs_m, mask=rmask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, D], dtype=ACC)
    doc_base = DOCS + b * sdocb
    doc_q = offs_m
    mask_lo = full_hi
    if DOC:
        doc_q = tl.load(doc_base + shift + offs_m, mask=rmask, other=-2)
        mask_lo = _doc_first_block(doc_base, shift, offs_m, TQ, TK, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, 0, full_hi, offs_m, offs_n, offs_d,
                   shift, TK, qk_scale, doc_base, doc_q, False, CAUSAL, DOC, ACC, PREC, UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, mask_lo, hi, offs_m, offs_n, offs_d,
                   shift, TK, qk_scale, doc_base, doc_q, True, CAUSAL, DOC, ACC, PREC, UPCAST, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _cfg(q, phase: str):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per phase; 32-bit+ dtypes get smaller tiles (shared memory)."""
    if q.element_size() >= 4:
        return 32, 32, 4, 2
    warps = 8 if q.shape[-1] == 128 else 4
    return (128, 64, warps, 3) if phase == "fwd" else (64, 64, warps, 2)


def _upcast(dtype) -> bool:
    # Interpreted iff this module's kernels were defined under TRITON_INTERPRET=1 (works on any triton).
    return dtype == torch.bfloat16 and type(_fwd).__name__ == "InterpretedFunction"


def _prec(dtype):
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


class FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, doc_ids=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        docs = _doc_table(doc_ids) if doc_ids is not None else None
        bsz, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((bsz, h, tq), dtype=acc_torch_dtype(q.dtype), device=q.device)
        bm, bn, warps, stages = _cfg(q, "fwd")
        grid = (triton.cdiv(tq, bm), bsz * h)
        _fwd[grid](q, k, v, o, lse, _docs_arg(docs, lse), sm_scale * LOG2E,
                   *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], _docs_stride(docs),
                   h, tq, tk, h // hkv, CAUSAL=causal, DOC=docs is not None, ACC=acc_dtype(q.dtype),
                   PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), BLOCK_M=bm, BLOCK_N=bn, D=d, num_warps=warps,
                   num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, *([docs] if docs is not None else []))
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        docs = docs[0] if docs else None
        do = _unit_last(do)
        bsz, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        acc, prec = acc_dtype(q.dtype), _prec(q.dtype)
        delta = torch.empty_like(lse)
        _bwd_delta[(triton.cdiv(tq, 64), bsz * h)](o, do, delta, *o.stride()[:3], *do.stride()[:3], h, tq,
                                                   ACC=acc, BLOCK_M=64, D=d)
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        bm, bn, warps, stages = _cfg(q, "bwd")
        qk_scale = ctx.sm_scale * LOG2E
        common = dict(CAUSAL=ctx.causal, DOC=docs is not None, ACC=acc, PREC=prec, UPCAST=_upcast(q.dtype),
                      BLOCK_M=bm, BLOCK_N=bn, D=d, num_warps=warps, num_stages=stages)
        _bwd_dkdv[(triton.cdiv(tk, bn), bsz * hkv)](
            q, k, v, do, lse, delta, dk, dv, _docs_arg(docs, lse), qk_scale, ctx.sm_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], _docs_stride(docs), h, hkv, tq, tk, h // hkv, **common)
        _bwd_dq[(triton.cdiv(tq, bm), bsz * h)](
            q, k, v, do, lse, delta, dq, _docs_arg(docs, lse), qk_scale, ctx.sm_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            _docs_stride(docs), h, tq, tk, h // hkv, **common)
        return dq, dk, dv, None, None, None


def _doc_table(doc_ids):
    """(B, 3, Tk) int32: each key's document id, and the first and last index in its row holding that
    id (any ids, repeated or not: a stable sort groups equal ids; no host sync)."""
    B, T = doc_ids.shape
    ids, pos = doc_ids.long(), torch.arange(T, device=doc_ids.device).expand(B, T)
    srt, perm = ids.sort(dim=1, stable=True)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ends = torch.ones_like(new)
    ends[:, :-1] = new[:, 1:]
    start = torch.cummax(torch.where(new, pos, 0), dim=1).values       # sorted slot of the group's first
    end = T - 1 - torch.cummax(torch.where(ends.flip(1), pos, 0), dim=1).values.flip(1)   # ... and last
    first = torch.empty_like(ids).scatter_(1, perm, perm.gather(1, start))
    last = torch.empty_like(ids).scatter_(1, perm, perm.gather(1, end))
    return torch.stack([ids, first, last], dim=1).to(torch.int32).contiguous()


def _docs_arg(docs, placeholder):
    """The DOCS pointer: the document ids, or any tensor when DOC=False (never read then)."""
    return docs if docs is not None else placeholder


def _docs_stride(docs) -> int:
    return docs.stride(0) if docs is not None else 0


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None, doc_ids=None):
    """Same signature as ``reference.attention``; raises ValueError for calls it cannot serve."""
    why = unsupported_reason(q, k, v, causal, dropout_p, doc_ids)
    if why:
        raise ValueError(f"triton flash attention: {why}")
    return FlashAttentionFn.apply(q, k, v, causal, scale, doc_ids)
