"""Triton flash attention vs ``reference.attention`` (torch SDPA), in Triton's CPU interpreter.

See test_kernels_norms.py for how the interpreter is switched on (inline or subprocess). Shapes are
tiny (the interpreter is slow) but cover block tails (T=1, 17, 100 with 32-wide fp32 tiles,
64-wide bf16 tiles), GQA/MQA, the KV-cache bottom-right causal mask and non-causal attention.
"""

import pytest
import torch

from conftest import interpreted_or_rerun
from megagpt_kernels import reference

# before anything here imports triton (see conftest.interpreted_or_rerun)
INTERPRETED = interpreted_or_rerun(globals())

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (3e-3, 3e-3)}


@pytest.fixture(scope="module")
def fa():
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels.triton import flash_attention
    return flash_attention


def _run(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return o.detach(), [t.grad for t in leaves]


def _check(fa, b, hq, hkv, tq, tk, d, dtype, causal, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    do = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    o, grads = _run(lambda q, k, v: fa.attention(q, k, v, causal, 0.0, scale), q, k, v, do)
    o_ref, grads_ref = _run(lambda q, k, v: reference.attention(q, k, v, causal, 0.0, scale),
                            q.float(), k.float(), v.float(), do.float())
    atol, rtol = TOL[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    for name, a, r in zip(("o", "dq", "dk", "dv"), [o] + grads, [o_ref] + grads_ref):
        assert a.dtype == dtype and a.shape == r.shape
        torch.testing.assert_close(a.float(), r.to(dtype).float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} ({dtype}, causal={causal}, T={tq}/{tk}, D={d}): {m}")


@pytest.mark.parametrize("t", [1, 17, 64, 100])
def test_causal_fp32_sequence_tails(fa, t):
    _check(fa, 2, 2, 2, t, t, 32, torch.float32, causal=True, seed=t)


@pytest.mark.parametrize("d", [16, 64])
def test_causal_fp32_head_dims(fa, d):
    _check(fa, 1, 2, 2, 40, 40, d, torch.float32, causal=True, seed=d)


def test_non_causal_with_custom_scale(fa):
    _check(fa, 1, 2, 2, 37, 37, 16, torch.float32, causal=False, scale=0.3)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_gqa_and_mqa(fa, hq, hkv):
    _check(fa, 2, hq, hkv, 33, 33, 16, torch.float32, causal=True, seed=hq * 10 + hkv)


@pytest.mark.parametrize("tq,tk", [(1, 37), (5, 70)])
def test_kv_cache_bottom_right_mask(fa, tq, tk):
    _check(fa, 1, 4, 2, tq, tk, 32, torch.float32, causal=True, seed=tq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions(fa, dtype):
    _check(fa, 1, 2, 1, 100, 100, 16, dtype, causal=True)


def test_strided_inputs_from_a_fused_qkv_projection(fa):
    # The model typically views (B, T, 3, H, D) projections as (B, H, T, D): non-contiguous strides.
    qkv = torch.randn(2, 19, 3, 2, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    torch.testing.assert_close(fa.attention(q, k, v, True), reference.attention(q, k, v, True), atol=2e-5, rtol=1e-4)


def test_gradcheck_float64_gqa_causal(fa):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    # fast_mode: random-projection gradcheck, a handful of interpreted kernel calls instead of hundreds.
    assert torch.autograd.gradcheck(lambda q, k, v: fa.attention(q, k, v, True), (q, k, v), fast_mode=True)


def test_refuses_what_it_cannot_do(fa):
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="dropout"):
        fa.attention(q, q, q, True, 0.1)
    with pytest.raises(ValueError, match="head dim 24"):
        fa.attention(q[..., :12].repeat(1, 1, 1, 2), q[..., :12].repeat(1, 1, 1, 2), q[..., :12].repeat(1, 1, 1, 2))
    with pytest.raises(ValueError, match="Tq=4 > Tk=2"):
        fa.attention(q, q[:, :, :2], q[:, :, :2], True)
    with pytest.raises(ValueError, match="multiple"):
        fa.attention(torch.randn(1, 3, 4, 16), q, q)
