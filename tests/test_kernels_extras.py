"""Optional fused kernels: vocab cross-entropy and bias + GELU vs the PyTorch references.

Triton's CPU interpreter is switched on as in test_kernels_norms.py (inline or subprocess).
"""

import pytest
import torch

from conftest import interpreted_or_rerun
from megagpt_kernels import reference

# before anything here imports triton (see conftest.interpreted_or_rerun)
INTERPRETED = interpreted_or_rerun(globals())


@pytest.fixture(scope="module")
def tk():
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels.triton import bias_gelu, cross_entropy
    return cross_entropy, bias_gelu


@pytest.mark.parametrize("dtype,v", [(torch.float32, 1000), (torch.float32, 5003), (torch.bfloat16, 5003)])
def test_cross_entropy_matches_reference(tk, dtype, v):
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(2, 7, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (2, 7), generator=g)
    labels[0, :3] = -100  # ignored positions: no loss, zero gradient, excluded from the mean
    out, ref = [], []
    for fn, dst in ((tk[0].cross_entropy, out), (reference.cross_entropy, ref)):
        x = logits.detach().clone().requires_grad_()
        loss = fn(x, labels)
        (loss * 2.5).backward()
        dst += [loss.detach(), x.grad]
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].float(), ref[1].float(), atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-2)
    assert out[1][0, :3].abs().max() == 0


def test_cross_entropy_with_no_counted_label_is_zero_not_nan(tk):
    """Every label ignored (a fully masked chunk of the LM loss): 0 and a zero gradient in both, as the
    vocab-parallel loss gives, not the 0/0 of a plain mean."""
    labels = torch.full((2, 5), -100)
    for fn in (tk[0].cross_entropy, reference.cross_entropy):
        x = torch.randn(2, 5, 300).requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0, fn


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_matches_reference(tk, dtype, approximate):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(37, 300, generator=g) * 3).to(dtype)
    b, dy = torch.randn(300, generator=g).to(dtype), torch.randn(37, 300, generator=g).to(dtype)
    res = []
    for fn, cast in ((tk[1].bias_gelu, dtype), (reference.bias_gelu, torch.float32)):
        xx, bb = x.to(cast).clone().requires_grad_(), b.to(cast).clone().requires_grad_()
        y = fn(xx, bb, approximate)
        y.backward(dy.to(cast))
        res.append([y.detach(), xx.grad, bb.grad])
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    for name, a, r in zip(("y", "dx", "db"), *res):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r.to(dtype).float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64(tk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: tk[1].bias_gelu(x, b, approximate), (x, b), fast_mode=True)
    labels = torch.tensor([1, -100, 6, 0, 3])
    assert torch.autograd.gradcheck(lambda x: tk[0].cross_entropy(x, labels), (x,), fast_mode=True)
