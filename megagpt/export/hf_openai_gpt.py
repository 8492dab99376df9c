"""megagpt post-LN GPT-1-style models ⇄ transformers ``OpenAIGPTLMHeadModel`` (name table: docs/export.md).

GPT-2's Conv1D block names (``hf_gpt2``) with ``tokens_embed``/``positions_embed``, no final norm
(post-LN) and an MLP fixed at 4 * n_embd. Its ``afn="gelu"`` is the *tanh approximation*
(``ACT_FNS["gelu"]`` is ``gelu_new``) and it has no exact GELU: ``activation="gelu"`` is refused
unless the caller accepts the approximation (``approximate_gelu``; at most 4.7e-4 per activation).
"""
from __future__ import annotations

from megagpt.model import ModelConfig

from .hf_gpt2 import common_refusals, conv1d_config, conv1d_from_hf, conv1d_names

ARCHITECTURE = "OpenAIGPTLMHeadModel"
MODEL_TYPE = "openai-gpt"
_ACT_FROM_HF = {"gelu": "gelu_tanh"}  # ACT_FNS["gelu"] is gelu_new, see the module docstring


def refusals(cfg: ModelConfig, approximate_gelu: bool = False) -> list[str]:
    checks = [(cfg.norm_position != "post", f"norm_position={cfg.norm_position!r} ({ARCHITECTURE} is post-LN)"),
              (cfg.activation == "gelu" and not approximate_gelu,
               f"activation='gelu' ({ARCHITECTURE}'s only GELU is the tanh approximation, up to 4.7e-4 off per "
               f"activation; use activation='gelu_tanh' or accept it with --approximate-gelu)"),
              (cfg.ffn_dim != 4 * cfg.n_embd,
               f"ffn_hidden={cfg.ffn_hidden} ({ARCHITECTURE}'s MLP is fixed at 4*n_embd={4 * cfg.n_embd})")]
    return common_refusals(cfg, ARCHITECTURE) + [why for bad, why in checks if bad]


def names(cfg: ModelConfig) -> list:
    return conv1d_names(cfg, "transformer", "tokens_embed", "positions_embed", final_norm=False)


def to_hf_config(cfg: ModelConfig, token_ids: dict):
    from transformers import OpenAIGPTConfig

    return OpenAIGPTConfig(**conv1d_config(cfg, token_ids), afn="gelu", architectures=[ARCHITECTURE])


def from_hf_config(c: dict) -> tuple[dict, list[str]]:
    bad = []
    if c.get("afn", "gelu") not in _ACT_FROM_HF:
        bad.append(f"afn={c.get('afn')!r}")
    kw = dict(conv1d_from_hf(c, vocab_size=40478, n_positions=512), ffn_hidden=None, norm_position="post",
              activation="gelu_tanh", scaled_residual_init=False)
    return kw, bad
