"""A tiny GPT trained a few steps through the Triton kernels (CPU interpreter) matches the reference.

Covers the kernels as the model really calls them: strided q/k/v views from the fused QKV
projection, post-LN LayerNorm and bias + GELU (``tiny``) and RMSNorm + GQA + RoPE (``tiny-modern``),
the cross-entropy over the (padded-vocab slice of the) logits, a sequence
length that is not a block multiple, and gradients flowing through every op into AdamW updates.
Interpreter switching: same inline-or-subprocess scheme as test_kernels_norms.py.
"""

import pytest
import torch

from conftest import interpreted_or_rerun
from megagpt_kernels import dispatch

# before anything here imports triton (see conftest.interpreted_or_rerun)
INTERPRETED = interpreted_or_rerun(globals())


def _train(preset: str, backend: str, monkeypatch, steps: int = 2):
    from megagpt.model import GPT, get_preset

    monkeypatch.setenv("MEGAGPT_KERNELS", backend)
    dispatch.reset()
    torch.manual_seed(0)
    model = GPT(get_preset(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (2, 22), generator=g)  # T = 21: not a multiple of any tile
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if backend == "triton":
        used = {k: v for k, v in dispatch.describe("cpu").items() if k in ("layer_norm", "rms_norm", "attention")}
        assert used == {"layer_norm": "triton", "rms_norm": "triton", "attention": "triton"}
        assert dispatch.fallbacks() == {}
        ran = {op for op, b, _ in dispatch._logged if b == "triton"}   # what the model really called
        want = {"attention", "cross_entropy"} | ({"layer_norm", "bias_gelu"} if preset == "tiny" else {"rms_norm"})
        assert ran == want
    return losses, model


@pytest.mark.parametrize("preset", ["tiny", "tiny-modern"])
def test_tiny_gpt_losses_match_reference(preset, monkeypatch):
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton's import: covered by the subprocess test")
    ref_losses, ref_model = _train(preset, "reference", monkeypatch)
    tri_losses, tri_model = _train(preset, "triton", monkeypatch)
    assert ref_losses[-1] < ref_losses[0]  # it really trained
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name} after training: {m}")
