"""Causal self-attention with a fused QKV projection, GQA, RoPE, an optional KV cache and an
optional document mask (packed samples: block-diagonal causal, ``data.reset_attention_mask``).

``qkv.weight`` has rows ``[q; k; v]``, heads contiguous within each. Under tensor parallelism
``qkv`` is column-parallel by heads (each rank holds ``[q_r; k_r; v_r]`` of its n_head/tp query
and n_kv_head/tp key/value heads) and ``proj`` is row-parallel.
"""
import contextlib

import torch
from torch import nn

from megagpt.tp import SERIAL
from megagpt.tp.layers import ColumnParallelLinear, RowParallelLinear
from megagpt_kernels import dispatch

from .embedding import Dropout, apply_rope


class KVCache:
    """Keys/values of the tokens seen so far, one (k, v) pair per layer, each (B, Hkv_local, T, D);
    ``length`` (the next token's position) is advanced by the GPT once all layers have run."""

    def __init__(self, n_layer: int):
        self.layers = [None] * n_layer
        self.length = 0

    def update(self, layer: int, k, v):
        if self.layers[layer] is not None:
            k_old, v_old = self.layers[layer]
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, tp=SERIAL):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head // tp.size, cfg.num_kv_heads // tp.size, cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.n_embd, (cfg.n_head + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.bias, tp)
        self.proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, cfg.bias, tp)
        self.attn_dropout = cfg.attn_dropout
        self.drop = Dropout(cfg.resid_dropout, tp)

    def forward(self, x, rope=None, kv_cache=None, doc_ids=None):
        """``doc_ids`` (B, T) (reset_attention_mask): a query sees only earlier keys of its own document;
        None: plain causal attention, no mask built."""
        qkv = self.qkv(x)                                       # (B, T, local heads * D): full T under SP
        B, T, _ = qkv.shape
        D = self.head_dim
        sizes = [self.n_head * D, self.n_kv_head * D, self.n_kv_head * D]
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split(sizes, dim=-1))   # (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        # heads differ per TP rank, so must their dropout masks: the per-rank generator
        with self.tp.rng.fork() if dropout_p and self.tp.size > 1 else contextlib.nullcontext():
            y = dispatch.attention(q, k, v, causal=True, dropout_p=dropout_p, scale=None, doc_ids=doc_ids)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * D)
        return self.drop(self.proj(y))
