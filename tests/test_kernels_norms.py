"""Triton LayerNorm/RMSNorm vs the PyTorch reference, run in Triton's CPU interpreter.

How the interpreter is switched on (robust to test order): Triton decides interpreted-vs-compiled
when each ``@triton.jit`` function is defined, including helpers inside triton itself, so
TRITON_INTERPRET=1 must be set before triton's first import in the process. If nothing imported
triton yet (running this file alone), ``interpreter_ready()`` sets it and the tests run inline.
If another test module already imported triton (e.g. via deepspeed) in the same pytest process,
the inline tests skip and one test re-runs this whole file in a fresh subprocess with the variable
set, failing with that run's output if any kernel test fails.
"""

import pytest
import torch

from conftest import interpreted_or_rerun
from megagpt_kernels import reference

# before anything here imports triton (see conftest.interpreted_or_rerun)
INTERPRETED = interpreted_or_rerun(globals())

TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10),
       torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(scope="module")
def tk():
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels.triton import layer_norm, rms_norm
    return layer_norm, rms_norm


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float() if dtype != torch.float64 else a, b.float() if dtype != torch.float64 else b,
                               atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [65, 100, 257])
def test_layer_norm_matches_reference(tk, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(2, 9, n, generator=g) * 3 + 1).to(dtype)
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(2, 9, n, generator=g).to(dtype)
    y, grads = _grads(lambda *a: tk[0].layer_norm(*a, 1e-5), (x, w, b), dy)
    # Ground truth: the reference in fp32 from the same (rounded) inputs, cast like the kernel's output.
    y_ref, grads_ref = _grads(lambda *a: reference.layer_norm(*a, 1e-5), (x.float(), w.float(), b.float()), dy.float())
    assert y.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    _close(y, y_ref.to(dtype), dtype, "y")
    for name, a, r in zip(("dx", "dw", "db"), grads, grads_ref):
        _close(a, r.to(dtype), dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [65, 257])
def test_rms_norm_matches_reference(tk, dtype, n):
    g = torch.Generator().manual_seed(n + 1)
    x = (torch.randn(3, 7, n, generator=g) * 2).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(3, 7, n, generator=g).to(dtype)
    y, grads = _grads(lambda *a: tk[1].rms_norm(*a, 1e-6), (x, w), dy)
    y_ref, grads_ref = _grads(lambda *a: reference.rms_norm(*a, 1e-6), (x.float(), w.float()), dy.float())
    _close(y, y_ref.to(dtype), dtype, "y")
    for name, a, r in zip(("dx", "dw"), grads, grads_ref):
        _close(a, r.to(dtype), dtype, name)


def test_norms_without_affine_params(tk):
    x = torch.randn(5, 33, dtype=torch.float32)
    dy = torch.randn(5, 33)
    y, (dx,) = _grads(lambda a: tk[0].layer_norm(a, None, None, 1e-5), (x,), dy)
    y_ref, (dx_ref,) = _grads(lambda a: reference.layer_norm(a, None, None, 1e-5), (x,), dy)
    _close(y, y_ref, torch.float32, "ln y")
    _close(dx, dx_ref, torch.float32, "ln dx")
    y, (dx,) = _grads(lambda a: tk[1].rms_norm(a, None, 1e-6), (x,), dy)
    y_ref, (dx_ref,) = _grads(lambda a: reference.rms_norm(a, None, 1e-6), (x,), dy)
    _close(y, y_ref, torch.float32, "rms y")
    _close(dx, dx_ref, torch.float32, "rms dx")


def test_many_rows_exercise_two_stage_reduction(tk):
    # 4 stage-1 programs on CPU, 10 rows each but 7 in the last: every row lands in exactly one partial.
    x, w, b, dy = torch.randn(37, 48) * 4, torch.randn(48), torch.randn(48), torch.randn(37, 48)
    _, grads = _grads(lambda *a: tk[0].layer_norm(*a, 1e-5), (x, w, b), dy)
    _, grads_ref = _grads(lambda *a: reference.layer_norm(*a, 1e-5), (x, w, b), dy)
    for name, a, r in zip(("dx", "dw", "db"), grads, grads_ref):
        torch.testing.assert_close(a, r, atol=2e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64(tk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: tk[0].layer_norm(x, w, b, 1e-5), (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w: tk[1].rms_norm(x, w, 1e-6), (x, w), fast_mode=True)
