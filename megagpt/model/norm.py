"""LayerNorm / RMSNorm whose forward is a call into ``megagpt_kernels.dispatch``.

Parameters are ``weight`` (ones) and, for LayerNorm with ``bias=True``, ``bias`` (zeros): the names
of ``torch.nn.LayerNorm``, so exporters map them one-to-one. They are replicated across TP ranks;
with sequence parallelism each rank normalises only its chunk, so their gradients are summed.
"""
import torch
from torch import nn

from megagpt.tp import SERIAL
from megagpt.tp.layers import copy_to_tp
from megagpt_kernels import dispatch


class Norm(nn.Module):
    def __init__(self, cfg, tp=SERIAL):
        super().__init__()
        self.kind, self.eps, self.tp = cfg.norm, cfg.norm_eps, tp
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.bias and cfg.norm == "layernorm" else None

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.tp.sequence_parallel:
            w = copy_to_tp(w, self.tp.group)
            b = copy_to_tp(b, self.tp.group) if b is not None else None
        if self.kind == "rmsnorm":
            return dispatch.rms_norm(x, w, self.eps)
        return dispatch.layer_norm(x, w, b, self.eps)
