"""Token + learned position embeddings, tensor-parallel dropout, and rotary embedding (RoPE).

With sequence parallelism the embedding output is reduce-scattered along the sequence, so each TP
rank adds the positions of its own chunk. RoPE uses the "rotate half" layout, as transformers'
Llama does, so an exported q/k projection needs no permutation; cos/sin are computed per call in
float32 (no buffers to save, move or down-cast; the cost is negligible next to attention).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.tp import SERIAL
from megagpt.tp.layers import VocabParallelEmbedding, copy_to_tp


class Dropout(nn.Module):
    """Dropout whose mask is the same on every TP rank for a replicated activation (the default
    generator) and differs per rank for one split along the sequence (the per-TP-rank generator)."""

    def __init__(self, p: float, tp=SERIAL):
        super().__init__()
        self.p, self.tp = p, tp

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        with self.tp.rng.fork() if self.tp.sequence_parallel else contextlib.nullcontext():
            return F.dropout(x, self.p, True)


class Positions(nn.Module):
    """Learned position table ``weight`` (max_seq_len, n_embd), replicated across TP; None for RoPE."""

    def __init__(self, cfg, tp=SERIAL):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.n_embd)) if cfg.pos_emb == "learned" else None

    def forward(self, x, start: int = 0, position_ids=None):
        """x (B, T_local, C) + the positions start.. of this rank's (sequence chunk of the) tokens,
        or, given ``position_ids`` (B, T) of the whole sequence (reset_position_ids), those."""
        if self.weight is None:
            return x
        n, weight = x.shape[1], self.weight
        if self.tp.sequence_parallel:
            start += self.tp.rank * n
            weight = copy_to_tp(weight, self.tp.group)   # each rank's grad covers only its chunk: sum them
        if position_ids is not None:
            first = self.tp.rank * n if self.tp.sequence_parallel else 0
            return x + F.embedding(position_ids[:, first:first + n], weight)
        return x + F.embedding(torch.arange(start, start + n, device=x.device), weight)


class Embedding(nn.Module):
    """``tok`` (padded_vocab x n_embd, vocab-parallel), ``pos`` (learned positions only), dropout."""

    def __init__(self, cfg, tp=SERIAL):
        super().__init__()
        self.tok = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.n_embd, tp)
        self.pos = Positions(cfg, tp) if cfg.pos_emb == "learned" else None
        self.drop = Dropout(cfg.embd_dropout, tp)

    def forward(self, input_ids, start: int = 0, position_ids=None):
        x = self.tok(input_ids)                 # (B, T, C), or (B, T/tp, C) with sequence parallelism
        if self.pos is not None:
            x = self.pos(x, start, position_ids)
        return self.drop(x)


def rope_cos_sin(cfg, start: int, length: int, device, position_ids=None):
    """RoPE cos, sin (length, head_dim) in float32 for positions start.., or None for learned positions;
    given ``position_ids`` (B, length) (reset_position_ids), per-row angles (B, 1, length, head_dim)."""
    if cfg.pos_emb != "rope":
        return None
    dims = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / cfg.rope_theta ** (dims / cfg.head_dim)
    if position_ids is not None:
        angles = position_ids.float()[:, None, :, None] * inv_freq
    else:
        angles = torch.arange(start, start + length, device=device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D) or (B, 1, T, D); returns x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
