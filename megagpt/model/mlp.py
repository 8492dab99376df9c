"""The feed-forward sublayer: ``fc`` -> activation -> ``proj``; SwiGLU: ``proj(silu(gate(x)) * fc(x))``.

``fc``/``gate`` are column-parallel, ``proj`` row-parallel. Gate and up projections are separate
matrices so tensor parallelism and HF Llama export split them without re-interleaving rows.
"""
import torch.nn.functional as F
from megagpt_kernels import dispatch
from torch import nn

from megagpt.tp import SERIAL
from megagpt.tp.layers import ColumnParallelLinear, RowParallelLinear, column_parallel_linear

from .embedding import Dropout


class MLP(nn.Module):
    def __init__(self, cfg, tp=SERIAL):
        super().__init__()
        self.activation = cfg.activation
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.fc = ColumnParallelLinear(cfg.n_embd, cfg.ffn_dim, cfg.bias, tp)
        self.gate = ColumnParallelLinear(cfg.n_embd, cfg.ffn_dim, cfg.bias, tp) if cfg.activation == "swiglu" else None
        self.proj = RowParallelLinear(cfg.ffn_dim, cfg.n_embd, cfg.bias, tp)
        self.drop = Dropout(cfg.resid_dropout, tp)

    def forward(self, x):
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.fc.bias is not None and dispatch.fused("bias_gelu", x.is_cuda):   # one pass for bias + GELU
            fc = self.fc
            h = dispatch.bias_gelu(column_parallel_linear(x, fc.weight, None, fc.group, fc.sequence_parallel),
                                   fc.bias, self.approximate)
        else:
            h = F.gelu(self.fc(x), approximate=self.approximate)
        return self.drop(self.proj(h))
