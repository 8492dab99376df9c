"""Learning-rate schedule: linear warmup to the peak, then cosine/linear decay to ``min_lr`` (or
constant). A ``LambdaLR`` handed to ``deepspeed.initialize``, so the engine steps it on every
applied optimizer step and saves/loads it with the checkpoint.

One formula, ``lr_at``, for pretraining and finetuning: ``Schedule.pretraining(train)`` takes the
train section's keys; ``Schedule.finetuning(lr, total_steps, warmup_frac)`` is GPT-1's recipe —
linear warmup over ``warmup_frac`` of the steps (at least one), then linear decay to 0 at the end.
"""
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Schedule:
    """The arguments of ``lr_at`` but the step."""

    lr: float
    min_lr: float
    warmup: int
    decay_iters: int
    style: str

    @classmethod
    def pretraining(cls, train_cfg) -> "Schedule":
        t = train_cfg
        return cls(t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters, t.lr_decay_style)

    @classmethod
    def finetuning(cls, lr: float, total_steps: int, warmup_frac: float) -> "Schedule":
        return cls(lr, 0.0, max(1, math.ceil(warmup_frac * total_steps)), total_steps, "linear")

    def at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.decay_iters, self.style)


def build_scheduler(optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor multiplies each group's initial lr (== ``schedule.lr``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.at(step) / schedule.lr)
