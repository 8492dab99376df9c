"""The feed-forward sublayer: ``fc`` -> activation -> ``proj`` (and ``gate`` for SwiGLU).

SwiGLU computes ``proj(silu(gate(x)) * fc(x))``; gate and up projections are separate Linears
(not one fused matrix) so tensor parallelism and HF Llama export (gate_proj/up_proj/down_proj)
split them without re-interleaving rows.
"""
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.activation = cfg.activation
        self.fc = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x):
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.activation == "gelu_tanh":
            h = F.gelu(self.fc(x), approximate="tanh")
        else:
            h = F.gelu(self.fc(x))
        return self.drop(self.proj(h))
