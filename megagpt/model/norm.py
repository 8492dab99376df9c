"""LayerNorm / RMSNorm modules whose forward is a call into ``megagpt_kernels.dispatch``.

Parameters are ``weight`` (ones at init) and, for LayerNorm with ``bias=True``, ``bias`` (zeros),
the same names as ``torch.nn.LayerNorm`` so exporters map them one-to-one.
"""
import torch
from torch import nn

from megagpt_kernels import dispatch


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return dispatch.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return dispatch.rms_norm(x, self.weight, self.eps)


def make_norm(cfg) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return LayerNorm(cfg.n_embd, cfg.norm_eps, bias=cfg.bias)
