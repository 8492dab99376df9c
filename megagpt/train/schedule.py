"""Learning-rate schedule: linear warmup to the peak, then cosine/linear decay to ``min_lr`` (or
constant). A ``LambdaLR`` handed to ``deepspeed.initialize``, so the engine steps it on every
applied optimizer step and saves/loads it with the checkpoint.
"""
import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int, style: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    span = max(1, decay_iters - warmup)
    frac = min(1.0, (step - warmup) / span)
    if style == "linear":
        coeff = 1.0 - frac
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_lr + coeff * (lr - min_lr)


def build_scheduler(optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor multiplies each group's initial lr (== train.lr)."""
    t = train_cfg
    decay = t.lr_decay_iters or t.train_iters

    def factor(step):
        return lr_at(step, t.lr, t.min_lr, t.lr_warmup_iters, decay, t.lr_decay_style) / t.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
