"""Learning-rate schedule: linear warmup to the peak, then cosine/linear decay to ``min_lr`` (or
constant), one formula (``lr_at``) for pretraining and finetuning (GPT-1's recipe: warmup over
``warmup_frac`` of the steps, at least one, then linear decay to 0). A ``LambdaLR`` handed to
``deepspeed.initialize``: the engine steps it on every applied step and checkpoints it.
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
    frac = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    coeff = 1.0 - frac if style == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))   # else cosine
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
    def pretraining(cls, t) -> "Schedule":   # t: the run config's train section
        return cls(t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters, t.lr_decay_style)

    @classmethod
    def from_saved(cls, client: dict) -> "Schedule":
        """The schedule a checkpoint ran with: its ``lr_schedule``, or (older ones) what its train section implies."""
        if "lr_schedule" in client:
            return cls(**client["lr_schedule"])
        t = client["config"]["train"]
        return cls(t["lr"], t["min_lr"], t["lr_warmup_iters"], t.get("lr_decay_iters") or t["train_iters"],
                   t["lr_decay_style"])

    def differences(self, other: "Schedule") -> list:
        """``["decay_iters 6 -> 8", ...]``: the settings in which ``other`` differs from this one."""
        return [f"{k} {getattr(self, k)} -> {getattr(other, k)}" for k in self.__dataclass_fields__
                if getattr(self, k) != getattr(other, k)]

    def factor(self, step: int) -> float:
        """LambdaLR's multiplier of the group's initial lr (== ``self.lr``)."""
        return self.at(step) / self.lr

    @classmethod
    def finetuning(cls, lr: float, total_steps: int, warmup_frac: float) -> "Schedule":
        return cls(lr, 0.0, max(1, math.ceil(warmup_frac * total_steps)), total_steps, "linear")

    def at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.decay_iters, self.style)


def build_scheduler(optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


def resume_schedule(scheduler, saved: Schedule, current: Schedule, override: bool) -> tuple:
    """After a checkpoint restored ``scheduler``: keep its schedule, or with ``override`` switch to ``current``
    (silently following a changed ``train_iters`` would jump the LR mid-run: the decay is stretched).
    Returns (the schedule in force, the line to print when they differ, else None)."""
    diff = saved.differences(current)
    if not diff:
        return current, None
    chosen = current if override else saved
    scheduler.lr_lambdas = [chosen.factor] * len(scheduler.lr_lambdas)
    scheduler.base_lrs = [chosen.lr] * len(scheduler.base_lrs)
    choice = ("--override-lr-schedule given, using this run's from here on" if override
              else "keeping the checkpoint's (pass --override-lr-schedule to use this run's)")
    return chosen, f"LR schedule differs from the checkpoint's ({', '.join(diff)}): {choice}"
