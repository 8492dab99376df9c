"""Named model configurations: the GPT-1 / GPT-2 papers, a modern (Llama-style) variant, and
tiny versions of each family for tests (no dropout, so tests are deterministic).

GPT-1 and GPT-2 use ``gelu_tanh``: what OpenAI's GPT-1 code, transformers' OpenAIGPT
(``afn="gelu"``) and GPT-2's ``gelu_new`` compute, so HF export of either family is exact.
"""
from megagpt.errors import MegaGPTError

from .config import ModelConfig

_GPT1 = dict(
    vocab_size=40000, n_layer=12, n_embd=768, n_head=12, ffn_hidden=3072, max_seq_len=512,
    norm="layernorm", norm_position="post", norm_eps=1e-5, pos_emb="learned", activation="gelu_tanh",
    bias=True, tie_embeddings=True, embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1,
    init_std=0.02, scaled_residual_init=False,
)
_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_position="pre", norm_eps=1e-5,
    pos_emb="learned", activation="gelu_tanh", bias=True, tie_embeddings=True,
    embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1, init_std=0.02, scaled_residual_init=True,
)
_MODERN = dict(
    vocab_size=32000, max_seq_len=2048, norm="rmsnorm", norm_position="pre", norm_eps=1e-6,
    pos_emb="rope", rope_theta=10000.0, activation="swiglu", bias=False, tie_embeddings=False,
    embd_dropout=0.0, resid_dropout=0.0, attn_dropout=0.0, init_std=0.02, scaled_residual_init=True,
)
_TINY = dict(vocab_size=1000, n_layer=2, n_embd=64, n_head=4, max_seq_len=64,
             embd_dropout=0.0, resid_dropout=0.0, attn_dropout=0.0)

PRESETS = {
    "gpt1": _GPT1,
    "gpt2-small": {**_GPT2, "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_embd": 1600, "n_head": 25},
    "modern-small": {**_MODERN, "n_layer": 12, "n_embd": 768, "n_head": 12, "n_kv_head": 4},
    "tiny": {**_GPT1, **_TINY, "ffn_hidden": None},
    "tiny-gpt2": {**_GPT2, **_TINY},
    "tiny-modern": {**_MODERN, **_TINY, "n_kv_head": 2},
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied (unknown fields raise MegaGPTError)."""
    if name not in PRESETS:
        raise MegaGPTError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}", key="preset")
    return ModelConfig.from_dict({**PRESETS[name], "name": name, **overrides})
