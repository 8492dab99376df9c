"""The training loop: composes data, engine step, NaN policy, eval, metrics and checkpoints.

DeepSpeed owns the optimizer, ZeRO, precision, gradient accumulation and clipping: per micro-batch
we call ``engine(...)``, ``engine.backward`` and ``engine.step`` (the engine updates on the
accumulation boundary). With pipeline parallelism DeepSpeed owns the micro-batch schedule too
(``engine.train_batch`` / ``eval_batch`` via ``megagpt.parallel.layout.train_step``). We own what
DeepSpeed does not know: the sample position (``consumed_samples``) and its prefetch, the
bad-step and loss-spike policies, SIGTERM and SIGINT (Ctrl-C) and when to evaluate or save.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megagpt.checkpoint.elastic import load_scheduler_state
from megagpt.data import DistributedBatchSampler, describe_samples
from megagpt.data.gpt_dataset import split_batch
from megagpt.tp.cross_entropy import IGNORE_INDEX

from .faults import FaultInjector


@dataclass
class TrainState:
    step: int = 0               # optimizer steps taken (or skipped) so far
    consumed_samples: int = 0   # global sample position (skipped steps and skip_ranges included)
    skipped_steps: int = 0      # steps dropped by nan_policy=skip
    rollbacks: int = 0          # loss spikes rolled back (spike_policy=rollback)
    skip_ranges: list = field(default_factory=list)   # [start, end) sample ranges of those spikes

    @classmethod
    def from_client(cls, client: dict) -> "TrainState":
        return cls(client["step"], client["consumed_samples"], client.get("skipped_steps", 0),
                   client.get("rollbacks", 0), [tuple(r) for r in client.get("skip_ranges", [])])


class NonFiniteLoss(Exception):
    """nan_policy=stop hit a NaN/inf loss or gradient (the last good step has been saved), or loss
    spikes outnumbered max_rollbacks."""


class StopFlag:
    """Set by SIGTERM (slurm preemption) or a first SIGINT (Ctrl-C); read collectively so every rank
    stops at the same step. A first SIGINT announces itself on rank 0 and puts back the SIGINT handler
    it replaced (Python's KeyboardInterrupt), so a second one aborts at once, without saving. A SIGINT
    that was ignored when training started (SIG_IGN: nohup, a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)   # the order of the agreed flags and of the names in the stop line

    def __init__(self, announce: bool = False, saving: bool = True, bar: bool = False):
        self.got = set()
        self.note = ((b"\n" if bar else b"") + b"SIGINT: stopping after this step" +
                     (b" and saving (Ctrl-C again to abort without saving)\n" if saving else
                      b" (Ctrl-C again to abort at once)\n")) if announce else b""
        signal.signal(signal.SIGTERM, self._handler)
        self.int_before = signal.getsignal(signal.SIGINT)
        if self.int_before not in (signal.SIG_IGN, None):   # None: a handler not set from Python
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.got.add(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.int_before)
            try:   # os.write: a print() here could re-enter one the main thread is in the middle of
                os.write(2, self.note)
            except OSError:
                pass

    def any_rank(self, group, device) -> str:
        """The signals any rank has got ('SIGINT', 'SIGTERM', 'SIGINT and SIGTERM'), '' for none."""
        t = torch.tensor([1.0 if s in self.got else 0.0 for s in self.SIGNALS], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return " and ".join(s.name for s, v in zip(self.SIGNALS, t.tolist()) if v)

    def close(self) -> None:
        """Training is over: SIGINT is the usual KeyboardInterrupt again (SIGTERM stays caught)."""
        if signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, self.int_before)


def to_batch(dataset, indices, device):
    tokens = torch.from_numpy(np.stack([dataset[i]["tokens"] for i in indices]).astype(np.int64)).to(device)
    return split_batch(tokens, getattr(dataset, "packing", None))   # plain (x, y) unless document masking


class UpdateGuard:
    """Keeps an update with a non-finite gradient out of the weights, on every rank alike.

    A pre-step hook on the torch optimizer: when any rank's gradients hold a NaN/inf (a NaN loss in
    any micro-batch, or an overflow in backward: the global gradient norm is not finite), every
    rank drops its gradients, so Adam leaves weights, moments and step counts alone. The check is
    all-reduced over the world because every rank steps its optimizer together (ZeRO partitions,
    TP slices, pipeline stages). DeepSpeed's ZeRO 1/2 optimizer checks the norm itself first and
    skips the step without advancing the LR schedule; ``skipped`` reports either and keeps the
    schedule on the step count."""

    def __init__(self, engine, device):
        self.engine, self.device, self.dropped = engine, device, False
        getattr(engine.optimizer, "optimizer", engine.optimizer).register_step_pre_hook(self._check)

    def _check(self, opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.tensor([float(not all(torch.isfinite(p.grad).all() for p in params))], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            for p in params:
                p.grad = None
            self.dropped = True

    def skipped(self, deepspeed_skips_before: int) -> bool:
        """Whether the step just taken left the weights alone (this hook or DeepSpeed's check)."""
        by_deepspeed = self.engine.skipped_steps > deepspeed_skips_before
        if by_deepspeed and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()
        out, self.dropped = self.dropped or by_deepspeed, False
        return out


class Prefetcher:
    """This rank's next step of micro-batches — (sample ids, [(input_ids, labels)]) — read by a
    background thread while the current step computes; ``next()`` returns it and how long the
    step waited for it. A new position (resume, rollback, skipped samples) gets a new Prefetcher."""

    def __init__(self, dataset, sampler, ga: int, device):
        import queue
        import threading

        self.queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()

        def work():
            it = iter(sampler)
            while not self.stopped.is_set():
                try:
                    ids = [next(it) for _ in range(ga)]
                    item = (ids, [to_batch(dataset, i, device) for i in ids])
                except BaseException as e:   # handed to the training thread, raised there
                    item = e
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return

        self.thread = threading.Thread(target=work, daemon=True, name="megagpt-prefetch")
        self.thread.start()

    def next(self):
        t0 = time.perf_counter()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item, time.perf_counter() - t0

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


def counted(labels) -> int:
    """Tokens that carry loss (label not -100)."""
    return int((labels != IGNORE_INDEX).sum())


def token_weights(micro_batches, dp_group) -> list | None:
    """Each micro-batch's loss factor that makes a step's loss the mean over every counted token of
    the global batch, however it is cut into micro-batches and data-parallel ranks.

    DeepSpeed weighs micro-batches equally (1 / (accumulation x DP)), and a micro-batch's loss is the
    mean over its counted labels (not -100). With ``data.eod_mask_loss`` the counts differ between
    micro-batches, so equal weights would make the update depend on the split (seen as a loss gap
    of 5e-3 between TP=2 at micro-batch 3 x 2 and the serial run at 1 x 6). Factor of a micro-batch
    with c counted tokens: c x accumulation x DP / N, N the step's count over all ranks (one
    all-reduce). None when every factor of this rank is exactly 1 (nothing masked): untouched."""
    counts = [counted(y) for _, y in micro_batches]
    total = torch.tensor([sum(counts)], dtype=torch.int64, device=micro_batches[0][1].device)
    dist.all_reduce(total, group=dp_group)
    return weights_of(counts, int(total.item()), dist.get_world_size(dp_group))


def weights_of(counts: list, n: int, dp: int) -> list | None:
    """``token_weights``'s factors from this rank's counts, the step's count ``n`` and the DP size."""
    k = len(counts) * dp
    if n == 0 or all(c * k == n for c in counts):
        return None
    return [c * k / n for c in counts]


def train_step(engine, micro_batches, dp_group, poison=None) -> float:
    """One optimizer step over ``micro_batches``; returns the loss over the global batch (its
    counted tokens' mean; NaN if a micro-batch's was). ``poison`` (tests): a factor for the last
    micro-batch's loss (NaN, or a spike)."""
    total = 0.0
    world = dist.get_world_size(dp_group)
    weights = token_weights(micro_batches, dp_group)
    for m, (x, y) in enumerate(micro_batches):
        loss = engine(x, labels=y)
        if weights is not None:
            loss = loss * weights[m]
        if poison is not None and m == len(micro_batches) - 1:
            loss = loss * poison
        s = loss.detach().float().clone()
        dist.all_reduce(s, group=dp_group)
        engine.backward(loss)
        engine.step()
        total += s.item() / world
    return total / len(micro_batches)


def pipeline_step(engine, micro_batches, par, poison=None) -> float:
    """One optimizer step by DeepSpeed's 1F1B schedule; the loss is the global batch's, as in
    ``train_step`` (on every stage). The last stage weighs its micro-batches' losses in the order
    the schedule computes them (``token_weights``). ``poison``: a factor for every micro-batch's
    loss on the last stage (it flows back through all)."""
    from megagpt.parallel.layout import train_step as pp_train_step

    loss_fn = engine.module.loss_fn
    weights = token_weights(micro_batches, par.dp_group) if micro_batches is not None else None
    factors = iter(weights or [])
    if weights is not None or poison is not None:
        engine.module.loss_fn = lambda *a: loss_fn(*a) * next(factors, 1.0) * (1.0 if poison is None else poison)
    try:
        return pp_train_step(engine, iter(micro_batches) if micro_batches is not None else None, par).item()
    finally:
        engine.module.loss_fn = loss_fn


def engine_counters(engine) -> tuple:
    """What an engine step advances besides the weights: DeepSpeed's step counters and the LR schedule."""
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return engine.global_steps, engine.global_samples, engine.skipped_steps, sched


def restore_engine_counters(engine, counters) -> None:
    engine.global_steps, engine.global_samples, engine.skipped_steps, sched = counters
    if sched is not None:
        load_scheduler_state(engine, sched)


class SpikeDetector:
    """A loss above ``factor`` x the mean of the previous ``window`` losses (of applied steps)."""

    def __init__(self, window: int, factor: float):
        self.losses, self.window, self.factor = [], window, factor

    def is_spike(self, loss: float) -> bool:
        recent = self.losses[-self.window:]
        if len(recent) == self.window and loss > self.factor * sum(recent) / len(recent):
            return True
        self.losses = recent + [loss]
        return False


@torch.no_grad()
def evaluate(engine, valid_ds, micro_batch_size, n_samples, par, device) -> float:
    """Mean loss over every counted token of the first ``n_samples`` validation samples (``eval_iters``
    global batches, so the same samples at every layout and micro-batch split; the mean is taken as
    ``token_weights`` takes it for training). Pipelines:
    DeepSpeed's ``eval_batch`` DP-averages each micro-batch's loss, so the last stage multiplies it
    by its count; middle stages hold no dataset, so the sample count is agreed on first and the
    token count taken from the stages that have it."""
    pipe, dp = par.pp_size > 1, par.dp_size
    n = n_samples
    if valid_ds is not None:
        n = min(n, len(valid_ds))
    if pipe:
        nt = torch.tensor([float(n)], device=device)
        dist.all_reduce(nt, op=dist.ReduceOp.MAX)
        n = int(nt.item())
    n -= n % (micro_batch_size * dp)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)   # (sum of token losses, tokens)
    loss_fn = engine.module.loss_fn if pipe else None
    try:
        for idx in DistributedBatchSampler(n, 0, micro_batch_size, par.dp_rank, dp):
            if pipe:
                batch = [to_batch(valid_ds, idx, device)] if par.needs_data else []
                c = counted(batch[0][1]) if batch else 0
                engine.module.loss_fn = lambda *a: loss_fn(*a) * c
                total[0] += float(engine.eval_batch(iter(batch) if batch else None, num_micro_batches=1)) * dp
            else:
                x, y = to_batch(valid_ds, idx, device)
                c = counted(y)
                total[0] += engine(x, labels=y).double() * c
            total[1] += c
    finally:
        if pipe:
            engine.module.loss_fn = loss_fn
    dist.all_reduce(total[1:] if pipe else total, group=par.dp_group)
    if pipe:   # the sums are on every stage already; the count only where there is data
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=par.pp_group)
    engine.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train(cfg, engine, train_ds, valid_ds, state: TrainState, metrics, par, device, save_fn,
          rollback_fn=None):
    """Run from ``state.step`` to ``train.train_iters``; returns the reason it ended.

    ``par`` (a megagpt.parallel ParallelState) gives the data-parallel group and selects
    DeepSpeed's pipeline schedule when pipeline_parallel > 1; ranks without data (middle stages)
    get ``train_ds=None``."""
    pipe = par.pp_size > 1
    t, dbg = cfg.train, cfg.debug
    dp_rank, dp_size, dp_group = par.dp_rank, par.dp_size, par.dp_group
    ga, mbs = t.gradient_accumulation_steps, t.micro_batch_size
    gbs = mbs * ga * dp_size
    guard, faults = UpdateGuard(engine, device), FaultInjector(dbg, t.save, engine)
    spikes = SpikeDetector(t.spike_window, t.spike_factor) if t.spike_policy == "rollback" else None
    harness = None
    if t.eval_harness_interval and t.eval_harness_tasks:   # lm-eval tasks on the gathered model (docs/evaluation.md)
        from megagpt.eval.periodic import PeriodicEval
        harness = PeriodicEval(cfg, device)
    it = None
    bar = getattr(metrics, "bar", None)   # a live tqdm line on the terminal: the SIGINT note starts a new line
    stop = StopFlag(announce=dist.get_rank() == 0, saving=bool(t.save), bar=bar is not None and not bar.disable)
    engine.train()
    try:
        while state.step < t.train_iters:
            for start, end in state.skip_ranges:   # samples of an earlier loss spike: jump over them
                if state.consumed_samples == start:
                    state.consumed_samples = end
                    it = it.close() if it is not None else None
            if it is None and train_ds is not None:
                sampler = DistributedBatchSampler(len(train_ds), state.consumed_samples, mbs, dp_rank, dp_size)
                it = Prefetcher(train_ds, sampler, ga, device)
            (ids, micro), waited = it.next() if it is not None else ((None, None), 0.0)
            poison = faults.before_step(state.step + 1, state.rollbacks, ids)
            counters = engine_counters(engine)
            loss = pipeline_step(engine, micro, par, poison) if pipe else train_step(engine, micro, dp_group, poison)
            faults.after_step()
            ok = not guard.skipped(counters[2])
            if not ok:
                if t.nan_policy == "stop":
                    restore_engine_counters(engine, counters)   # the update was dropped: back at the last good step
                    save_fn(state)
                    raise NonFiniteLoss(f"non-finite loss or gradient (loss {loss}) at step {state.step + 1}; saved "
                                        f"the last good step {state.step} (nan_policy=stop)")
                state.skipped_steps += 1
                metrics.print(f"step {state.step + 1}: non-finite loss or gradient (loss {loss}), update skipped on "
                              f"every rank ({state.skipped_steps} skipped so far)")
            elif spikes is not None and spikes.is_spike(loss):
                span = (state.consumed_samples, state.consumed_samples + gbs)
                if state.rollbacks >= t.max_rollbacks:
                    raise NonFiniteLoss(f"loss spike at step {state.step + 1} ({loss:.4f}; the mean of the last "
                                        f"{t.spike_window} steps x {t.spike_factor} is lower) after {state.rollbacks} "
                                        f"rollbacks (max_rollbacks={t.max_rollbacks}): stopping")
                where = describe_samples(train_ds, range(*span)) if train_ds is not None else "another stage's data"
                state = rollback_fn(state, span)
                metrics.print(f"step {span[0] // gbs + 1}: loss spike ({loss:.4f}): rolled back to step {state.step} "
                              f"and skipping its samples {span[0]}..{span[1] - 1} ({where}); rollback "
                              f"{state.rollbacks} of at most {t.max_rollbacks}")
                spikes, it = SpikeDetector(t.spike_window, t.spike_factor), it.close() if it is not None else None
                continue
            state.step += 1
            state.consumed_samples += gbs
            metrics.step(state.step, loss, engine.get_lr()[0], engine.get_global_grad_norm() if ok else None,
                         state.skipped_steps, log=state.step % t.log_interval == 0, data_wait=waited)
            last = state.step == t.train_iters
            if t.eval_interval and (valid_ds is not None or pipe) and (state.step % t.eval_interval == 0 or last):
                metrics.eval(state.step, evaluate(engine, valid_ds, mbs, t.eval_iters * gbs, par, device))
                metrics.reset_timer()
            if harness is not None and harness.due(state.step, last):
                harness.run(engine, state.step, metrics)
                metrics.reset_timer()
            preempted = stop.any_rank(dist.group.WORLD, device)  # every DP group (TP, PP ranks) stops alike
            exiting = bool(t.exit_interval) and state.step % t.exit_interval == 0 and not last
            if t.save and (last or preempted or exiting or (t.save_interval and state.step % t.save_interval == 0)):
                save_fn(state, kill=dbg.sigkill_in_save_at_step == state.step)
                metrics.reset_timer()
            if preempted or exiting:
                why = preempted or f"exit_interval={t.exit_interval}"
                metrics.print(f"{why}: stopped after step {state.step}" + (", checkpoint saved" if t.save else ""))
                return "preempted" if preempted else "exit_interval"
    finally:   # the prefetch thread; Ctrl-C after the loop is a plain KeyboardInterrupt again
        stop.close()
        if it is not None:
            it.close()
    return "done"
