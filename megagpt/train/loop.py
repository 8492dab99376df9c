"""The training loop: composes data, engine step, NaN policy, eval, metrics and checkpoints.

DeepSpeed owns the optimizer, ZeRO, precision, gradient accumulation and clipping: per micro-batch
we call ``engine(...)``, ``engine.backward`` and ``engine.step`` (the engine updates on the
accumulation boundary). With pipeline parallelism DeepSpeed owns the micro-batch schedule too
(``engine.train_batch`` / ``eval_batch`` via ``megagpt.parallel.layout.train_step``). We own what DeepSpeed does not know: the sample position
(``consumed_samples``), the bad-loss policy, SIGTERM and when to evaluate or save.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megagpt.data import DistributedBatchSampler


@dataclass
class TrainState:
    step: int = 0               # optimizer steps taken (or skipped) so far
    consumed_samples: int = 0   # global samples drawn so far (skipped steps included)
    skipped_steps: int = 0      # steps dropped by nan_policy=skip


class NonFiniteLoss(Exception):
    """nan_policy=stop hit a NaN/inf loss; the last good step has been saved."""


class StopFlag:
    """Set by SIGTERM (slurm preemption); read collectively so every rank stops at the same step."""

    def __init__(self):
        self.set = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.set = True

    def any_rank(self, group, device) -> bool:
        t = torch.tensor([1.0 if self.set else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())


def to_batch(dataset, indices, device):
    tokens = torch.from_numpy(np.stack([dataset[i]["tokens"] for i in indices]).astype(np.int64)).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train_step(engine, micro_batches, dp_group, device, inject_nan: bool):
    """One optimizer step over ``micro_batches``; returns (dp-mean loss, finite?, micro-batches done).

    The dp-summed loss of each micro-batch is all-reduced *before* backward: if any rank's loss is
    NaN/inf the sum is too, every rank learns it at once, and none calls backward or step — so no
    gradient or optimizer state is touched (with gradient accumulation the check runs per
    micro-batch; a bad micro-batch after good ones is treated as "stop", see ``train`` below)."""
    total = 0.0
    world = dist.get_world_size(dp_group)
    for m, (x, y) in enumerate(micro_batches):
        loss = engine(x, labels=y)
        if inject_nan:
            loss = loss * float("nan")
        s = loss.detach().float().clone()
        dist.all_reduce(s, group=dp_group)
        mean = s.item() / world
        if not math.isfinite(mean):
            return mean, False, m
        engine.backward(loss)
        engine.step()
        total += mean
    return total / len(micro_batches), True, len(micro_batches)


def pipeline_step(engine, micro_batches, par, inject_nan: bool):
    """One optimizer step by DeepSpeed's 1F1B schedule; the loss is the DP mean (on every stage).

    The step is taken before the loss is known, so a non-finite loss cannot be kept out of the
    weights: the caller stops without saving (the last complete checkpoint stays the good one)."""
    from megagpt.parallel.layout import train_step as pp_train_step

    loss = pp_train_step(engine, iter(micro_batches) if micro_batches is not None else None, par).item()
    if inject_nan:
        loss = float("nan")
    return loss, math.isfinite(loss), 1


@torch.no_grad()
def evaluate(engine, valid_ds, micro_batch_size, eval_iters, par, device) -> float:
    """Mean loss over the first ``eval_iters`` global micro-batches of the validation split: the
    DP mean at every layout (pipelines: DeepSpeed's ``eval_batch``, already DP-averaged on every
    stage; middle stages hold no dataset, so the sample count is agreed on first)."""
    pipe, dp = par.pp_size > 1, par.dp_size
    n = eval_iters * micro_batch_size * dp
    if valid_ds is not None:
        n = min(n, len(valid_ds))
    if pipe:
        nt = torch.tensor([float(n)], device=device)
        dist.all_reduce(nt, op=dist.ReduceOp.MAX)
        n = int(nt.item())
    n -= n % (micro_batch_size * dp)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for idx in DistributedBatchSampler(n, 0, micro_batch_size, par.dp_rank, dp):
        if pipe:
            batch = iter([to_batch(valid_ds, idx, device)]) if par.needs_data else None
            total[0] += float(engine.eval_batch(batch, num_micro_batches=1))
        else:
            x, y = to_batch(valid_ds, idx, device)
            total[0] += engine(x, labels=y).double()
        total[1] += 1
    if not pipe:
        dist.all_reduce(total, group=par.dp_group)
    engine.train()
    return (total[0] / total[1]).item()


def train(cfg, engine, train_ds, valid_ds, state: TrainState, metrics, par, device, save_fn):
    """Run from ``state.step`` to ``train.train_iters``; returns the reason it ended.

    ``par`` (a megagpt.parallel ParallelState) gives the data-parallel group and selects
    DeepSpeed's pipeline schedule when pipeline_parallel > 1; ranks without data (middle stages)
    get ``train_ds=None``."""
    pipe = par.pp_size > 1
    t, dbg = cfg.train, cfg.debug
    dp_rank, dp_size, dp_group = par.dp_rank, par.dp_size, par.dp_group
    ga, mbs = t.gradient_accumulation_steps, t.micro_batch_size
    gbs = mbs * ga * dp_size
    it = None
    if train_ds is not None:
        it = iter(DistributedBatchSampler(len(train_ds), state.consumed_samples, mbs, dp_rank, dp_size))
    stop = StopFlag()
    engine.train()
    while state.step < t.train_iters:
        if state.step + 1 in (dbg.hang_at_step, dbg.kill_at_step) and dist.get_rank() == dist.get_world_size() - 1:
            if dbg.kill_at_step == state.step + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        ids = [next(it) for _ in range(ga)] if it is not None else None
        micro = [to_batch(train_ds, i, device) for i in ids] if ids is not None else None
        if dbg.sample_ids and ids is not None and t.save:
            os.makedirs(t.save, exist_ok=True)
            with open(os.path.join(t.save, f"samples_rank{dist.get_rank()}.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.step + 1, "ids": [i for m in ids for i in m]}) + "\n")
        inject = dbg.inject_nan_at_step == state.step + 1
        if pipe:
            loss, ok, done = pipeline_step(engine, micro, par, inject)
            if not ok:
                raise NonFiniteLoss(f"non-finite loss ({loss}) at step {state.step + 1}: with pipeline "
                                    f"parallelism the update is already applied, so nothing was saved; resume "
                                    f"from the last complete checkpoint")
        else:
            loss, ok, done = train_step(engine, micro, dp_group, device, inject)
        if not ok:
            if t.nan_policy == "stop" or done > 0:
                save_fn(state)  # the model is still at the last good step
                raise NonFiniteLoss(
                    f"non-finite loss ({loss}) at step {state.step + 1} (micro-batch {done}); saved the last good "
                    f"step {state.step} (nan_policy={t.nan_policy}" +
                    (", and gradients of earlier micro-batches were already accumulated" if done else "") + ")")
            state.skipped_steps += 1
            if engine.lr_scheduler is not None:  # keep the schedule aligned with the step count
                engine.lr_scheduler.step()
            metrics.print(f"step {state.step + 1}: non-finite loss, step skipped "
                          f"({state.skipped_steps} skipped so far)")
        state.step += 1
        state.consumed_samples += gbs
        metrics.step(state.step, loss, engine.get_lr()[0], engine.get_global_grad_norm() if ok else None,
                     state.skipped_steps, log=state.step % t.log_interval == 0)
        last = state.step == t.train_iters
        if t.eval_interval and (valid_ds is not None or pipe) and (state.step % t.eval_interval == 0 or last):
            metrics.eval(state.step, evaluate(engine, valid_ds, mbs, t.eval_iters, par, device))
            metrics.reset_timer()
        preempted = stop.any_rank(dist.group.WORLD, device)  # every DP group (TP, PP ranks) stops alike
        exiting = bool(t.exit_interval) and state.step % t.exit_interval == 0 and not last
        if t.save and (last or preempted or exiting or (t.save_interval and state.step % t.save_interval == 0)):
            save_fn(state, kill=dbg.sigkill_in_save_at_step == state.step)
            metrics.reset_timer()
        if preempted or exiting:
            why = "SIGTERM" if preempted else f"exit_interval={t.exit_interval}"
            metrics.print(f"{why}: stopped after step {state.step}" + (", checkpoint saved" if t.save else ""))
            return "preempted" if preempted else "exit_interval"
    return "done"
