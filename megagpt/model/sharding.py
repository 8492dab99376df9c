"""How each GPT parameter is split across tensor-parallel ranks (pure tensor functions).

    embed.tok.weight, lm_head.weight        rows (vocab)          VocabParallelEmbedding / vocab-parallel head
    blocks.i.attn.qkv.weight/.bias          qkv: each of q, k, v split by heads, local rows [q_r; k_r; v_r]
    blocks.i.mlp.fc/.gate .weight/.bias     rows (ffn)            ColumnParallelLinear (SwiGLU: both alike)
    blocks.i.attn.proj.weight, mlp.proj.weight   cols             RowParallelLinear
    everything else (norms, positions, row-parallel biases)       replicated
"""
import re

import torch

from megagpt.errors import MegaGPTError

_KINDS = {"qkv": re.compile(r"attn\.qkv\.(weight|bias)$"),
          "rows": re.compile(r"(^embed\.tok\.weight|^lm_head\.weight|mlp\.(fc|gate)\.(weight|bias))$"),
          "cols": re.compile(r"(attn\.proj|mlp\.proj)\.weight$")}
_DIM = {"rows": 0, "cols": 1}   # the dimension a rows/cols parameter is split along


def shard_kind(name: str) -> str:
    return next((kind for kind, pattern in _KINDS.items() if pattern.search(name)), "replicated")


def check_tp(cfg, tp: int) -> None:
    """Refuse layouts whose splits would be uneven."""
    for what, n in (("n_head", cfg.n_head), ("n_kv_head", cfg.num_kv_heads), ("ffn_dim", cfg.ffn_dim),
                    ("padded vocabulary", cfg.padded_vocab_size)):
        if n % tp:
            raise MegaGPTError(f"tensor_parallel={tp} does not divide {what}={n}")


def _qkv_sizes(cfg, tp=1):
    d = cfg.head_dim
    return [cfg.n_head * d // tp, cfg.num_kv_heads * d // tp, cfg.num_kv_heads * d // tp]


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int, cfg) -> torch.Tensor:
    """This TP rank's slice of the full parameter ``name``."""
    kind = shard_kind(name)
    if kind == "replicated" or tp == 1:
        return full
    if kind in _DIM:
        return full.chunk(tp, dim=_DIM[kind])[tp_rank]
    q, k, v = full.split(_qkv_sizes(cfg), dim=0)
    return torch.cat([t.chunk(tp, dim=0)[tp_rank] for t in (q, k, v)], dim=0)


def merge(name: str, shards: list, cfg) -> torch.Tensor:
    """The full parameter from every TP rank's slice (in TP-rank order)."""
    kind, tp = shard_kind(name), len(shards)
    if kind == "replicated" or tp == 1:
        return shards[0]
    if kind in _DIM:
        return torch.cat(shards, dim=_DIM[kind])
    parts = [s.split(_qkv_sizes(cfg, tp), dim=0) for s in shards]
    return torch.cat([torch.cat([p[i] for p in parts], dim=0) for i in range(3)], dim=0)


def pipeline_layer_prefixes(cfg) -> list:
    """Serial-name prefix of each pipeline layer index (``layer_XX-model_YY-model_states.pt``):
    token table, positions (+ embedding dropout), one per block, ln_f (pre-LN), and the head
    (the token table again when tied). See megagpt/model/pipeline.py."""
    norm = ["ln_f."] if cfg.norm_position == "pre" else []
    head = "embed.tok." if cfg.tie_embeddings else "lm_head."
    return ["embed.tok.", "embed.pos.", *(f"blocks.{i}." for i in range(cfg.n_layer)), *norm, head]


def with_tied_names(sd: dict, cfg) -> dict:
    """With tied embeddings the token table and the head are one Parameter under two names, and a
    writer may have kept either: return ``sd`` with both names holding it (the one such fix-up)."""
    if not cfg.tie_embeddings:
        return sd
    tok = sd.get("embed.tok.weight", sd.get("lm_head.weight"))
    return sd if tok is None else {**sd, "embed.tok.weight": tok, "lm_head.weight": tok}
