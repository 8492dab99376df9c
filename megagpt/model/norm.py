"""LayerNorm / RMSNorm modules whose forward is a call into ``megagpt_kernels.dispatch``.

Parameters are ``weight`` (ones at init) and, for LayerNorm with ``bias=True``, ``bias`` (zeros),
the same names as ``torch.nn.LayerNorm`` so exporters map them one-to-one. Norm weights are
replicated across tensor-parallel ranks; with sequence parallelism each rank normalises only its
sequence chunk, so the weights pass through ``copy_to_tp`` to have their gradients summed.
"""
import torch
from torch import nn

from megagpt.tp import SERIAL
from megagpt.tp.layers import copy_to_tp
from megagpt_kernels import dispatch


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float, bias: bool = True, tp=SERIAL):
        super().__init__()
        self.kind, self.eps, self.tp = kind, eps, tp
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.tp.sequence_parallel:
            w = copy_to_tp(w, self.tp.group)
            b = copy_to_tp(b, self.tp.group) if b is not None else None
        if self.kind == "rmsnorm":
            return dispatch.rms_norm(x, w, self.eps)
        return dispatch.layer_norm(x, w, b, self.eps)


def make_norm(cfg, tp=SERIAL) -> Norm:
    return Norm(cfg.norm, cfg.n_embd, cfg.norm_eps, bias=cfg.bias, tp=tp)
