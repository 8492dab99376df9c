"""Causal self-attention with a fused QKV projection, GQA, RoPE and an optional KV cache.

``qkv.weight`` has rows ``[q (n_head*D); k (n_kv_head*D); v (n_kv_head*D)]``, heads contiguous
within each. The score computation itself is ``megagpt_kernels.dispatch.attention``.
"""
import torch
from torch import nn

from megagpt_kernels import dispatch

from .embedding import apply_rope


class KVCache:
    """Keys/values of the tokens seen so far, one (k, v) pair per layer, each (B, Hkv, T, D).

    ``seq_len`` is the number of cached positions: the next token's position. Layers append in
    order during a forward; ``GPT.forward`` advances ``seq_len`` once all layers have run.
    """

    def __init__(self, n_layer: int):
        self.layers = [None] * n_layer
        self.seq_len = 0

    def update(self, layer: int, k, v):
        if self.layers[layer] is not None:
            k_old, v_old = self.layers[layer]
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, rope=None, kv_cache=None):
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * D, self.n_kv_head * D, self.n_kv_head * D], dim=-1)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)       # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv_head, D).transpose(1, 2)    # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = dispatch.attention(q, k, v, causal=True, dropout_p=dropout_p, scale=None)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * D)
        return self.drop(self.proj(y))
