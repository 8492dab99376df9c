"""Token + learned position embeddings, and rotary position embedding (RoPE).

RoPE uses the "rotate half" layout (the first and second halves of each head's dims form the
rotated pairs), as transformers' Llama does, so an exported q/k projection needs no permutation.
cos/sin are computed per call from the positions in float32: no buffers to save, move or
down-cast, and the cost (T x head_dim/2) is negligible next to attention.
"""
import torch
from torch import nn


class Embedding(nn.Module):
    """``tok`` (padded_vocab x n_embd) and, for learned positions, ``pos`` (max_seq_len x n_embd)."""

    def __init__(self, cfg):
        super().__init__()
        self.tok = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.embd_dropout)

    def forward(self, input_ids, positions):
        x = self.tok(input_ids)
        if self.pos is not None:
            x = x + self.pos(positions)
        return self.drop(x)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin of shape (T, head_dim) for integer ``positions`` (T,), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D); returns x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
