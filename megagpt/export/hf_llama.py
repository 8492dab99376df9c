"""megagpt RMSNorm/RoPE/SwiGLU models ⇄ transformers ``LlamaForCausalLM`` (name table: docs/export.md).

Both use Linear (out, in) layouts and rotate-half RoPE: no transposes or q/k permutations; our fused
qkv is sliced by rows into q/k/v. ``bias`` maps to ``attention_bias`` and ``mlp_bias``.
"""
from __future__ import annotations

from megagpt.model import ModelConfig

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"


def refusals(cfg: ModelConfig) -> list[str]:
    checks = [(cfg.norm != "rmsnorm", f"norm={cfg.norm!r} ({ARCHITECTURE} has RMSNorm only)"),
              (cfg.norm_position != "pre", f"norm_position={cfg.norm_position!r} ({ARCHITECTURE} is pre-norm)"),
              (cfg.pos_emb != "rope", f"pos_emb={cfg.pos_emb!r} ({ARCHITECTURE} has rotary positions only)"),
              (cfg.activation != "swiglu",
               f"activation={cfg.activation!r} ({ARCHITECTURE}'s MLP is gated: act(gate(x)) * up(x))")]
    return [why for bad, why in checks if bad]


def names(cfg: ModelConfig) -> list:
    q, kv = cfg.n_head * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    table = [("embed.tok.weight", "model.embed_tokens.weight", "vocab")]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}", f"model.layers.{i}"
        table.append((f"{p}.ln1.weight", f"{h}.input_layernorm.weight", "copy"))
        for kind in kinds:
            for proj, a, b in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                table.append((f"{p}.attn.qkv.{kind}", f"{h}.self_attn.{proj}.{kind}", ("rows", a, b)))
            table.append((f"{p}.attn.proj.{kind}", f"{h}.self_attn.o_proj.{kind}", "copy"))
        table.append((f"{p}.ln2.weight", f"{h}.post_attention_layernorm.weight", "copy"))
        for kind in kinds:
            for ours, hf in (("gate", "gate_proj"), ("fc", "up_proj"), ("proj", "down_proj")):
                table.append((f"{p}.mlp.{ours}.{kind}", f"{h}.mlp.{hf}.{kind}", "copy"))
    table.append(("ln_f.weight", "model.norm.weight", "copy"))
    if not cfg.tie_embeddings:
        table.append(("lm_head.weight", "lm_head.weight", "vocab"))
    return table


def to_hf_config(cfg: ModelConfig, token_ids: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.attn_dropout,
        architectures=[ARCHITECTURE], **token_ids)


def _rope_theta(c: dict, bad: list) -> float:
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        bad.append(f"rope_parameters.rope_type={rp.get('rope_type', rp.get('type'))!r} (megagpt has plain RoPE)")
    return float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))


def from_hf_config(c: dict) -> tuple[dict, list[str]]:
    bad = []
    hidden, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    if c.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={c.get('hidden_act')!r} (megagpt's gated MLP is SwiGLU)")
    if c.get("head_dim") not in (None, hidden // heads):
        bad.append(f"head_dim={c.get('head_dim')} (megagpt needs hidden_size/num_attention_heads={hidden // heads})")
    if c.get("attention_bias", False) != c.get("mlp_bias", False):
        bad.append(f"attention_bias={c.get('attention_bias')} with mlp_bias={c.get('mlp_bias')} "
                   f"(megagpt has one bias switch for every linear)")
    kw = dict(
        vocab_size=c.get("vocab_size", 32000), n_layer=c.get("num_hidden_layers", 32), n_embd=hidden,
        n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
        ffn_hidden=c.get("intermediate_size", 11008), max_seq_len=c.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_position="pre", norm_eps=c.get("rms_norm_eps", 1e-6), pos_emb="rope",
        rope_theta=_rope_theta(c, bad), activation="swiglu", bias=bool(c.get("attention_bias", False)),
        tie_embeddings=c.get("tie_word_embeddings", False), embd_dropout=0.0, resid_dropout=0.0,
        attn_dropout=c.get("attention_dropout", 0.0) or 0.0, init_std=c.get("initializer_range", 0.02),
        scaled_residual_init=False)
    return kw, bad
