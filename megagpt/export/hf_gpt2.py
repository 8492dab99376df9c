"""megagpt pre-LN GPT-2-style models ⇄ transformers ``GPT2LMHeadModel`` (name table: docs/export.md).

HF's ``Conv1D`` stores (in, out), our ``nn.Linear`` (out, in): hence the ``"T"`` entries. The
Conv1D-family helpers here (name table, refusals, config keys) serve ``hf_openai_gpt`` too.
"""
from __future__ import annotations

from megagpt.model import ModelConfig

ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPE = "gpt2"
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def conv1d_names(cfg: ModelConfig, prefix: str, tok: str, pos: str, final_norm: bool) -> list:
    """The (ours, hf, op) table shared by GPT-2 and OpenAI GPT (both use Conv1D blocks)."""
    table = [("embed.tok.weight", f"{prefix}.{tok}.weight", "vocab"),
             ("embed.pos.weight", f"{prefix}.{pos}.weight", "copy")]
    sub = [("ln1", "ln_1", "copy"), ("attn.qkv", "attn.c_attn", "T"), ("attn.proj", "attn.c_proj", "T"),
           ("ln2", "ln_2", "copy"), ("mlp.fc", "mlp.c_fc", "T"), ("mlp.proj", "mlp.c_proj", "T")]
    for i in range(cfg.n_layer):
        for ours, hf, op in sub:
            table.append((f"blocks.{i}.{ours}.weight", f"{prefix}.h.{i}.{hf}.weight", op))
            table.append((f"blocks.{i}.{ours}.bias", f"{prefix}.h.{i}.{hf}.bias", "copy"))
    if final_norm:
        table += [("ln_f.weight", f"{prefix}.ln_f.weight", "copy"), ("ln_f.bias", f"{prefix}.ln_f.bias", "copy")]
    if not cfg.tie_embeddings:
        table.append(("lm_head.weight", "lm_head.weight", "vocab"))
    return table


def common_refusals(cfg: ModelConfig, hf_name: str) -> list[str]:
    """What no Conv1D-family HF GPT can express: rmsnorm, rope, swiglu, missing biases, GQA."""
    checks = [(cfg.norm != "layernorm", f"norm={cfg.norm!r} ({hf_name} has LayerNorm only)"),
              (cfg.pos_emb != "learned", f"pos_emb={cfg.pos_emb!r} ({hf_name} has learned positions only)"),
              (cfg.activation not in ("gelu", "gelu_tanh"),
               f"activation={cfg.activation!r} ({hf_name} has no gated MLP)"),
              (not cfg.bias, f"bias=False ({hf_name} always has biases)"),
              (cfg.num_kv_heads != cfg.n_head,
               f"n_kv_head={cfg.n_kv_head} ({hf_name} has multi-head attention only, no GQA/MQA)")]
    return [why for bad, why in checks if bad]


def conv1d_config(cfg: ModelConfig, token_ids: dict) -> dict:
    """The config.json entries GPT-2 and OpenAI GPT name alike."""
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, resid_pdrop=cfg.resid_dropout, embd_pdrop=cfg.embd_dropout,
                attn_pdrop=cfg.attn_dropout, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
                tie_word_embeddings=cfg.tie_embeddings, **token_ids)


def conv1d_from_hf(c: dict, vocab_size: int, n_positions: int) -> dict:
    """ModelConfig kwargs from the entries GPT-2 and OpenAI GPT name alike (absent: HF's defaults)."""
    return dict(vocab_size=c.get("vocab_size", vocab_size), n_layer=c.get("n_layer", 12),
                n_embd=c.get("n_embd", 768), n_head=c.get("n_head", 12), max_seq_len=c.get("n_positions", n_positions),
                norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), pos_emb="learned", bias=True,
                tie_embeddings=c.get("tie_word_embeddings", True), embd_dropout=c.get("embd_pdrop", 0.1),
                resid_dropout=c.get("resid_pdrop", 0.1), attn_dropout=c.get("attn_pdrop", 0.1),
                init_std=c.get("initializer_range", 0.02))


def refusals(cfg: ModelConfig) -> list[str]:
    out = common_refusals(cfg, ARCHITECTURE)
    if cfg.norm_position != "pre":
        out.append(f"norm_position={cfg.norm_position!r} ({ARCHITECTURE} is pre-LN)")
    return out


def names(cfg: ModelConfig) -> list:
    return conv1d_names(cfg, "transformer", "wte", "wpe", final_norm=True)


def to_hf_config(cfg: ModelConfig, token_ids: dict):
    from transformers import GPT2Config

    return GPT2Config(**conv1d_config(cfg, token_ids), n_inner=cfg.ffn_hidden,
                      activation_function=_ACT_TO_HF[cfg.activation], architectures=[ARCHITECTURE])


def from_hf_config(c: dict) -> tuple[dict, list[str]]:
    """HF config.json dict → (ModelConfig kwargs, list of unsupported settings)."""
    bad = []
    if c.get("activation_function", "gelu_new") not in _ACT_FROM_HF:
        bad.append(f"activation_function={c.get('activation_function')!r}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if c.get(key, ok) != ok:
            bad.append(f"{key}={c.get(key)!r}")
    kw = dict(conv1d_from_hf(c, vocab_size=50257, n_positions=1024), ffn_hidden=c.get("n_inner"),
              norm_position="pre", activation=_ACT_FROM_HF.get(c.get("activation_function", "gelu_new"), "gelu_tanh"),
              scaled_residual_init=True)
    return kw, bad
