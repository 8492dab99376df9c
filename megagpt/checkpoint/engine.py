"""Crash-safe save/resume of a live DeepSpeed engine: a tag counts only once every rank's files are on disk.

Save: every rank writes its shard (``engine.save_checkpoint(..., save_latest=False)``) and fsyncs
the tag dir; after a barrier rank 0 checks the expected files exist, copies the tokenizer into the
tag (``tokenizer/``: a checkpoint is self-contained), writes ``manifest.json`` (size and sha256 of
every file), ``complete`` and then ``latest`` (each published atomically), and prunes old tags. A
run SIGKILLed anywhere in between leaves a tag without ``complete``, which load ignores and, in the
run's own --save dir, renames ``<tag>.incomplete`` (never deletes: it may be a whole checkpoint that
lost its marker); a failed write removes its tag at once; a complete tag damaged later fails its
manifest on resume and the previous one is used — so a resume always starts from a checkpoint that
was whole. Which tag readers take is ``tags.resolve_tag``'s rule.

Per-rank RNG states go to ``rng_rank{R}.pt`` beside DeepSpeed's files because DeepSpeed keeps only
rank 0's client state (ZeRO <= 2) and dropout streams differ per rank.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from megagpt.atomic import atomic_dir, fsync_tree, write_bytes_atomic
from megagpt.errors import MegaGPTError, first_line

from .tags import COMPLETE, LATEST, complete_tags, newest_complete_tag, step_tags, tag_for
from .tokenizer_files import TOKENIZER_DIR, write_tokenizer

__all__ = ["save", "load", "tag_for", "rng_state", "set_rng_state"]


def rng_state(tracker=None) -> dict:
    """Every generator a step draws from: python, numpy, torch, accelerator, and the per-TP-rank
    dropout stream (``tracker``, a megagpt.tp.random.RNGTracker) when there is one."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(),
         "torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()}
    if tracker is not None:
        s["tp_tracker"] = tracker.get_state()
    return s


def set_rng_state(s: dict, tracker=None) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    get_accelerator().set_rng_state(s["accelerator"])
    if tracker is not None and "tp_tracker" in s:
        tracker.set_state(s["tp_tracker"])


def _check_files(tag_dir: str, zero_stage: int, world: int) -> None:
    model = glob.glob(os.path.join(tag_dir, "*model_states.pt"))
    optim = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    rng = glob.glob(os.path.join(tag_dir, "rng_rank*.pt"))
    want_optim = world if zero_stage > 0 else 0
    if not model or len(optim) < want_optim or len(rng) != world:
        raise MegaGPTError(f"{tag_dir}: incomplete after every rank saved ({len(model)} model, {len(optim)} "
                           f"optimizer, {len(rng)} rng files for {world} ranks); not marking it complete")
    for f in model + optim:
        if os.path.getsize(f) == 0:
            raise MegaGPTError(f"{f}: empty checkpoint file")


MANIFEST = "manifest.json"


def write_manifest(tag_dir: str) -> None:
    """``manifest.json``: size and sha256 of every file of the tag (``complete`` comes after it)."""
    files = {}
    for d, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(d, name)
            files[os.path.relpath(path, tag_dir)] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    write_bytes_atomic(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files}, indent=1).encode())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_tag(tag_dir: str) -> str | None:
    """What is wrong with a complete tag by its manifest (None: whole, or a tag saved before manifests)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        files = json.loads(open(path).read())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for rel, want in sorted(files.items()):
        f = os.path.join(tag_dir, rel)
        if not os.path.isfile(f):
            return f"{rel} is missing"
        if os.path.getsize(f) != want["size"]:
            return f"{rel} has {os.path.getsize(f)} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def save(engine, save_dir: str, step: int, client_state: dict, keep_last: int = 0,
         kill_before_complete: bool = False, tokenizer: str | None = None, tracker=None) -> str:
    """Save tag ``global_step{step}`` (with the ``tokenizer`` files, when given); returns the tag.
    Collective over the whole world.

    A failed write on any rank (disk full, permissions, I/O error) removes the partial tag and
    raises one MegaGPTError on every rank; earlier complete tags are never touched. (A rank that
    fails inside DeepSpeed's save joins its closing barrier before the ranks compare notes.)"""
    tag = tag_for(step)
    tag_dir = os.path.join(save_dir, tag)
    rank = dist.get_rank()
    if os.path.isfile(os.path.join(tag_dir, COMPLETE)):  # this very step is already saved whole
        dist.barrier()                                   # (e.g. a NaN stop right after an interval
        return tag                                       # save): never rewrite a good checkpoint
    if rank == 0 and os.path.isdir(tag_dir):  # a leftover of the same step without its marker
        _set_aside_unmarked(save_dir, [tag], "saving that step again")
    dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        failure = f"rank {rank}: {first_line(e)}"
        dist.barrier()   # the one the other ranks wait in at the end of save_checkpoint
    if failure is None:
        try:
            torch.save(rng_state(tracker), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
            fsync_tree(tag_dir)
        except (OSError, RuntimeError) as e:
            failure = f"rank {rank}: {first_line(e)}"
    _raise_if_failed(failure, tag_dir, save_dir)
    if kill_before_complete and rank == 0:  # test hook: die with every shard written, no marker
        os.kill(os.getpid(), 9)
    if rank == 0:
        try:
            _check_files(tag_dir, engine.zero_optimization_stage(), dist.get_world_size())
            if tokenizer is not None:
                with atomic_dir(os.path.join(tag_dir, TOKENIZER_DIR), force=True) as tmp:
                    write_tokenizer(tokenizer, tmp)
            write_manifest(tag_dir)
            write_bytes_atomic(os.path.join(tag_dir, COMPLETE), b"ok\n")   # the tag is whole from here on;
        except (OSError, MegaGPTError) as e:
            failure = f"rank 0: {e if isinstance(e, MegaGPTError) else first_line(e)}"
    _raise_if_failed(failure, tag_dir, save_dir)
    if rank == 0:
        try:   # only then the hint for DeepSpeed, and pruning
            write_bytes_atomic(os.path.join(save_dir, LATEST), tag.encode())
        except OSError as e:
            print(f"warning: {save_dir}/{LATEST} not updated ({first_line(e)}); {tag} is complete", flush=True)
        if keep_last:
            for _, old in complete_tags(save_dir)[:-keep_last]:
                shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def _raise_if_failed(failure, tag_dir: str, save_dir: str) -> None:
    """Collective: every rank learns whether any failed; then the partial tag goes and all raise."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [f for f in failures if f]
    if not failed:
        return
    free = shutil.disk_usage(save_dir).free / 2 ** 20   # before the partial tag frees its space
    full = " — the disk is full" if free < 64 else ""
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()
    prev = newest_complete_tag(save_dir)
    raise MegaGPTError(f"{tag_dir}: saving failed ({failed[0]}; {free:.1f} MiB were free there{full}); removed "
                       f"the partial tag, the last complete checkpoint ({prev or 'none'}) is untouched")


def _check_model(where: str, client: dict, expect: dict) -> None:
    """A different architecture would fail deep inside DeepSpeed; name the differing keys instead."""
    saved = (client.get("config") or {}).get("model")
    if saved is None:
        return
    diff = sorted(k for k in set(saved) | set(expect) if k != "name" and saved.get(k) != expect.get(k))
    if diff:
        raise MegaGPTError(f"{where}: checkpoint model differs from the config in "
                           + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, config {expect.get(k)!r})" for k in diff))


def check_global_batch(where: str, client: dict, engine) -> None:
    """The step count, LR schedule and data position are counted in global batches: refuse another size."""
    saved, now = (client.get("ds_config") or {}).get("train_batch_size"), engine.train_batch_size()
    if not isinstance(saved, int) or saved == now:
        return
    mbs, dp = engine.train_micro_batch_size_per_gpu(), engine.dp_world_size
    fix = (f"--gradient-accumulation-steps {saved // (mbs * dp)}" if saved % (mbs * dp) == 0 else
           f"micro-batch x accumulation x data-parallel {dp} = {saved}")
    raise MegaGPTError(f"{where}: saved with a global batch of {saved} samples, this run's is {now} (micro-batch "
                       f"{mbs} x accumulation {engine.gradient_accumulation_steps()} x data-parallel {dp}); resume "
                       f"with the same global batch ({fix})")


def _set_aside(ckpt_dir: str, tag: str, why: str) -> str:
    """Rename ``tag`` to ``<tag>.<why>`` (``<tag>.<why>1``, ... when taken): kept for inspection, and
    no longer a ``global_stepN`` that readers, pruning or the next save of that step would touch."""
    aside = next(name for name in (f"{tag}.{why}{n or ''}" for n in itertools.count())
                 if not os.path.lexists(os.path.join(ckpt_dir, name)))
    os.replace(os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, aside))
    return aside


def _set_aside_unmarked(save_dir: str, tags: list[str], why: str) -> None:
    """Tags of this run's --save dir without ``complete`` (a save that did not finish) → ``<tag>.incomplete``."""
    moved = [f"{t} -> {_set_aside(save_dir, t, 'incomplete')}" for t in tags]
    print(f"warning: {save_dir}: no '{COMPLETE}' marker in {', '.join(tags)} (a save that did not finish): {why}; "
          f"renamed {', '.join(moved)}", flush=True)


def choose_tag(load_dir: str, fallback: bool = True) -> str | None:
    """The newest complete tag whose files match its manifest (collective: rank 0 checks, every
    rank gets its answer). Damaged newer tags are renamed ``<tag>.damaged`` (kept for inspection,
    never read or overwritten) when an older whole one exists; with ``fallback`` off, or with no
    whole tag left (never silently start over), one error."""
    choice = [None, None]   # tag, error
    if dist.get_rank() == 0:
        damaged = []
        for _, tag in reversed(complete_tags(load_dir)):
            problem = verify_tag(os.path.join(load_dir, tag))
            if problem is None:
                choice[0] = tag
                break
            damaged.append((tag, f"{load_dir}/{tag}: damaged ({problem})"))
        if damaged and (not fallback or choice[0] is None):
            why = "checkpoint_fallback=false" if not fallback else "no earlier complete tag to fall back to"
            choice = [None, f"{damaged[0][1]}; not resuming ({why}): move it away to resume from an earlier "
                            f"tag, or from scratch"]
        for tag, msg in damaged if choice[0] else []:
            aside = _set_aside(load_dir, tag, "damaged")
            print(f"warning: {msg}; renamed it {aside}, resuming from {choice[0]}", flush=True)
    dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise MegaGPTError(choice[1])
    return choice[0]


def load(engine, load_dir: str, expect_model: dict | None = None, par=None, fallback: bool = True,
         save_dir: str | None = None):
    """Load the newest complete tag into ``engine``; returns its client state (None: fresh start).

    Tag dirs without a ``complete`` marker (a save that did not finish) are never read nor deleted:
    rank 0 renames them ``<tag>.incomplete`` when ``load_dir`` is this run's ``save_dir`` (so that
    step can be saved again), and elsewhere only says it skips them. A directory DeepSpeed saved
    alone (a ``latest`` and no marker anywhere) is refused with one line, never touched. A tag
    failing its manifest is set aside (``choose_tag``). A tag of another layout (``par``: this
    run's ParallelState) resumes through ``elastic.load_elastic``; the same layout through
    DeepSpeed's own load, with every rank's RNG state."""
    from .deepspeed_files import read_client_state
    from .elastic import load_elastic, saved_layout

    if not os.path.isdir(load_dir):
        return None
    done = {t for _, t in complete_tags(load_dir)}
    if not done and os.path.isfile(os.path.join(load_dir, LATEST)):
        raise MegaGPTError(f"{load_dir}: a DeepSpeed checkpoint without megagpt's completion markers (not "
                           f"written by megagpt pretraining); not resuming from it, and nothing was deleted")
    unmarked = [t for _, t in step_tags(load_dir) if t not in done]
    if unmarked and dist.get_rank() == 0:
        if save_dir and os.path.realpath(save_dir) == os.path.realpath(load_dir):
            _set_aside_unmarked(load_dir, unmarked, "not resumed from")
        else:
            print(f"warning: {load_dir}: skipping {', '.join(unmarked)} (no '{COMPLETE}' marker: a save that did "
                  f"not finish); left as they are", flush=True)
    dist.barrier()
    tag = choose_tag(load_dir, fallback)
    if tag is None:
        return None
    where = f"{load_dir}/{tag}"
    saved, _ = read_client_state(os.path.join(load_dir, tag))   # a damaged file: one line naming it
    if expect_model is not None:
        _check_model(where, saved, expect_model)
    check_global_batch(where, saved, engine)
    was = saved_layout(saved)
    now = {"dp": engine.dp_world_size, "tp": par.tp_size if par else 1, "pp": par.pp_size if par else 1,
           "zero": engine.zero_optimization_stage()}
    if was != now:
        if dist.get_rank() == 0:
            print(f"elastic resume of {where}: saved at " + ", ".join(f"{k}={was[k]}" for k in was)
                  + "; now " + ", ".join(f"{k}={now[k]}" for k in now) + " (weights, Adam state, LR schedule and "
                  "data position carried; dropout streams restart per rank from the seed)", flush=True)
        load_elastic(engine, load_dir, tag, saved)
        resync_cpu_adam(engine)
        return {**saved, "_tag": tag}
    try:
        path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:   # truncated/corrupt files, deep in torch
        raise MegaGPTError(f"{where}: cannot load this checkpoint ({first_line(e)}); it is damaged — move the "
                           f"tag away to resume from the previous complete one") from None
    if path is None:
        raise MegaGPTError(f"{where}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(load_dir, tag, f"rng_rank{dist.get_rank()}.pt")
    if not os.path.isfile(rng_file):
        raise MegaGPTError(f"{rng_file}: missing (a damaged checkpoint: every rank saves its RNG state)")
    set_rng_state(torch.load(rng_file, weights_only=False), par.rng if par else None)
    resync_cpu_adam(engine)
    client["_tag"] = tag
    return client


def resync_cpu_adam(engine) -> None:
    """Bring DeepSpeed's CPU Adam kernel's hidden beta powers to where an uninterrupted run has them.

    Why resume drifted in the last bits (every ZeRO stage, CPU only): the CPU kernels (FusedAdam
    on the CPU accelerator, DeepSpeedCPUAdam for offload) keep ``beta1**t`` and ``beta2**t`` for
    the bias correction in a C++ object that lives as long as the process, not in the optimizer
    state. A process that ran steps 1..N got them by N-1 float32 multiplications; a fresh process
    resuming at N+1 computes ``pow(beta, N+1)`` once, and the two differ by an ulp (0.9**16:
    0.18530193 vs 0.18530194), so every update after a resume was off in the last bit. Replaying
    the kernel's call sequence for steps 1..N (every group, every step) on 1-element dummies
    reproduces the uninterrupted values exactly. No-op for other optimizers and devices (CUDA's
    kernel computes the powers on every call)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    cpu_fused = isinstance(base, FusedAdam) and get_accelerator().device_name() == "cpu"
    if not (cpu_fused or isinstance(base, DeepSpeedCPUAdam)):
        return
    n = max((int(st["step"]) for st in base.state.values() if "step" in st), default=0)
    for step in range(1, n + 1):
        for g in base.param_groups:   # (ZeRO-3 empties them between steps)
            p, grad, m, v = (torch.zeros(1) for _ in range(4))
            b1, b2 = g["betas"]
            if cpu_fused:
                base.multi_tensor_adam(2048 * 32, base._dummy_overflow_buf, [[grad], [p], [m], [v]], g["lr"], b1, b2,
                                       g["eps"], step, base.adam_w_mode, 1 if g["bias_correction"] else 0,
                                       g["weight_decay"])
            else:
                base.ds_opt_adam.adam_update(base.opt_id, step, g["lr"], b1, b2, g["eps"], g["weight_decay"],
                                             g["bias_correction"], p, grad, m, v)
