"""megagpt_kernels.dispatch: which backend each op gets, why, logged once, and safe fallbacks.

The forced-Triton test needs Triton's CPU interpreter: same inline-or-subprocess scheme as
test_kernels_norms.py (see its docstring).
"""
import importlib.util
import logging
import sys

import pytest
import torch

from conftest import interpreter_ready, rerun_interpreted
from megagpt_kernels import dispatch, reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = HAVE_TRITON and interpreter_ready()

if HAVE_TRITON and not INTERPRETED:
    def test_in_triton_interpreter_subprocess():
        rc, out = rerun_interpreted(__file__)
        assert rc == 0, out[-6000:]


@pytest.fixture(autouse=True)
def clean(monkeypatch, caplog):
    monkeypatch.delenv("MEGAGPT_KERNELS", raising=False)
    caplog.set_level(logging.INFO, logger="megagpt.kernels")
    dispatch.reset()
    yield
    dispatch.reset()


def _msgs(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "megagpt.kernels" and r.levelno == level]


def test_cpu_defaults_to_reference_and_logs_once_per_op(caplog):
    x, w, b = torch.randn(3, 10), torch.randn(10), torch.randn(10)
    assert dispatch.describe("cpu") == {op: "reference" for op in
                                        ("layer_norm", "rms_norm", "attention", "cross_entropy", "bias_gelu")}
    for _ in range(3):
        torch.testing.assert_close(dispatch.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5))
    dispatch.rms_norm(x, w)
    msgs = _msgs(caplog)
    assert msgs == ["megagpt kernels: layer_norm -> reference (CPU tensors (auto))",
                    "megagpt kernels: rms_norm -> reference (CPU tensors (auto))"]


def test_env_switch(monkeypatch):
    monkeypatch.setenv("MEGAGPT_KERNELS", "reference")
    assert dispatch.describe("cpu", with_reasons=True)["attention"] == ("reference", "MEGAGPT_KERNELS=reference")
    monkeypatch.setenv("MEGAGPT_KERNELS", "Triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend, why = dispatch.describe("cpu", with_reasons=True)["layer_norm"]
    assert backend == "reference" and "TRITON_INTERPRET is unset" in why
    monkeypatch.setenv("MEGAGPT_KERNELS", "Reference")  # read on every call: switches a running process
    assert dispatch.backend_name() == "reference"
    monkeypatch.setenv("MEGAGPT_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEGAGPT_KERNELS='fast' is not one of auto, reference, triton, cuda"):
        dispatch.layer_norm(torch.randn(2, 4), None, None)


def test_broken_triton_import_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("MEGAGPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    for _ in range(3):
        torch.testing.assert_close(dispatch.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5))
    warnings = _msgs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "triton layer_norm unavailable" in warnings[0] and "falling back" in warnings[0]
    assert ("triton", "layer_norm") in dispatch.fallbacks()
    assert dispatch.describe("cpu")["layer_norm"] == "reference"


def test_cuda_layer_norm_without_gpu_falls_back(monkeypatch, caplog):
    monkeypatch.setenv("MEGAGPT_KERNELS", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend, why = dispatch.describe("cpu", with_reasons=True)["layer_norm"]
    assert backend == "reference" and "CUDA tensors" in why
    x = torch.randn(2, 6)
    torch.testing.assert_close(dispatch.layer_norm(x, None, None), reference.layer_norm(x, None, None))


def test_unservable_attention_calls_route_to_reference(monkeypatch, caplog):
    monkeypatch.setenv("MEGAGPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 6, 24)
    torch.testing.assert_close(dispatch.attention(q, q, q), reference.attention(q, q, q))
    q16 = torch.randn(1, 2, 6, 16)
    torch.manual_seed(0)
    out = dispatch.attention(q16, q16, q16, True, 0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(out, reference.attention(q16, q16, q16, True, 0.5))
    dispatch.attention(q16, q16[:, :, :3], q16[:, :, :3], True)  # causal with Tq > Tk
    msgs = "\n".join(_msgs(caplog))
    assert "attention -> reference (head dim 24 not in (16, 32, 64, 128))" in msgs
    assert "attention -> reference (dropout_p=0.5 > 0: the fused kernel is dropout-free)" in msgs
    assert "attention -> reference (causal with Tq=6 > Tk=3)" in msgs


def test_forced_triton_runs_the_kernels_under_the_interpreter(monkeypatch, caplog):
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton's import: covered by the subprocess test")
    monkeypatch.setenv("MEGAGPT_KERNELS", "triton")
    assert set(dispatch.describe("cpu").values()) == {"triton"}
    from megagpt_kernels.triton import flash_attention, layer_norm, rms_norm
    assert dispatch._pick("layer_norm", False) is layer_norm.layer_norm
    assert dispatch._pick("rms_norm", False) is rms_norm.rms_norm
    assert dispatch._pick("attention", False) is flash_attention.attention
    x, w, b = torch.randn(5, 40), torch.randn(40), torch.randn(40)
    torch.testing.assert_close(dispatch.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5))
    torch.testing.assert_close(dispatch.rms_norm(x, w), reference.rms_norm(x, w))
    q, k = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16)
    torch.testing.assert_close(dispatch.attention(q, k, k), reference.attention(q, k, k), atol=2e-5, rtol=1e-4)
    logits, labels = torch.randn(6, 50), torch.tensor([1, 2, -100, 4, 49, 0])
    torch.testing.assert_close(dispatch.cross_entropy(logits, labels), reference.cross_entropy(logits, labels))
    torch.testing.assert_close(dispatch.bias_gelu(x, w, "tanh"), reference.bias_gelu(x, w, "tanh"), atol=2e-5, rtol=1e-4)
    assert "megagpt kernels: attention -> triton (MEGAGPT_KERNELS=triton with TRITON_INTERPRET=1)" in _msgs(caplog)
    assert dispatch.fallbacks() == {}


def test_triton_runtime_failure_falls_back_once(monkeypatch, caplog):
    """A Triton compile/resource error at call time (simulated) -> one warning, reference result."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton's import: covered by the subprocess test")
    from triton.runtime.errors import OutOfResources
    from megagpt_kernels.triton import rms_norm as trms

    def boom(*a, **k):
        raise OutOfResources(300000, 232448, "shared memory")
    monkeypatch.setattr(trms, "rms_norm", boom)
    monkeypatch.setenv("MEGAGPT_KERNELS", "triton")
    x, w = torch.randn(3, 8), torch.randn(8)
    for _ in range(2):
        torch.testing.assert_close(dispatch.rms_norm(x, w), reference.rms_norm(x, w))
    warnings = _msgs(caplog, logging.WARNING)
    assert len(warnings) == 1 and "triton rms_norm failed (OutOfResources" in warnings[0]
    assert dispatch.describe("cpu")["rms_norm"] == "reference"
