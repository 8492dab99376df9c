"""``train.compile``: each transformer block under ``torch.compile`` (inductor, static shapes).

Why per block rather than the whole model (``engine.compile()``): every block has the same code and
shapes, so one graph is traced and compiled once and reused by all layers (compile time does not
grow with depth); the model's own Python around the blocks (input checks, the loss, the KV cache)
stays eager; and activation checkpointing, which wraps each block call, simply recomputes the
compiled block in backward. ``nn.Module.compile`` compiles in place, so parameter names (and with
them checkpoints, ZeRO partitioning and the HF exporter) are unchanged, and DeepSpeed's ZeRO-3
gather/release hooks run as they do eagerly. The first step pays the compilation: ``Metrics``
reports it as ``compile_s`` and leaves it out of throughput and MFU.

Under ZeRO-3 those hooks sit on every submodule and are ``torch.compiler.disable``d, so each block
splits into small graphs (and dynamo logs that a DeepSpeed hook hit its recompile limit: that hook
stays eager): correct, but little is fused, and on CPU it measured slower (docs/benchmarks.md).
Opt-in, default off: on CPU the gain (fp32 under ZeRO-0; bf16 on an AMX Xeon, 1.03-1.07x) was
within the noise of a shared machine.
"""
from __future__ import annotations

from torch import nn

from megagpt.model.gpt import Block


def compile_blocks(model: nn.Module, enabled: bool) -> int:
    """Compile every ``Block`` of ``model`` in place when ``enabled`` (a GPT or a pipeline stage);
    returns how many were compiled (0 when off: the model is left exactly as built)."""
    if not enabled:
        return 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.compile(dynamic=False)   # the training shapes are fixed: no symbolic-shape guards to pay for
    return len(blocks)


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run under torch.compile (for tests and the log line)."""
    return [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
