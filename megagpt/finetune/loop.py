"""GPT-1 finetuning on a DeepSpeed engine: examples → task transform → GPT + head → L2 + λ·L1.

One process or N ranks under the ``deepspeed`` launcher (``tensor_parallel`` ranks share a replica;
the head is replicated). Evaluation gives each replica a contiguous slice (no padding duplicates)
and gathers the predictions, so every rank computes the same metrics; rank 0 writes ``<save>/best``
when the main metric improves. Config, DeepSpeed JSON, parameter groups and LR schedule are pretraining's.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from megagpt.atomic import write_text_atomic
from megagpt.config import FinetuneConfig
from megagpt.errors import MegaGPTError

from . import metrics
from .checkpoint import save_best
from .heads import FinetuneModel
from .tasks import encode, get_task
from .transforms import SpecialIds, pad_batch


def init_distributed():
    """gloo process group: from the launcher's env, or a 1-rank group for a plain process."""
    import deepspeed

    if dist.is_initialized():
        return
    from megagpt.train.distributed import release_deepspeed_shm_name, single_process_env

    single_process_env()   # plain `python run.py`: a group of one
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    release_deepspeed_shm_name()


def build_model(cfg: FinetuneConfig, task, tp):
    """GPT (pretrained or random; this rank's ``tp`` slice) + tokenizer path → FinetuneModel."""
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    if cfg.init == "random":   # cfg.validate() made sure a tokenizer is given
        tok = load_tokenizer(cfg.tokenizer)
        gpt = GPT(get_preset(cfg.preset, vocab_size=tok.vocab_size, **cfg.model_overrides), tp)
        tok_path = cfg.tokenizer
    else:   # any checkpoint load_model reads; it loads the tokenizer and checks it against the vocabulary
        from megagpt.checkpoint import load_model

        gpt, tok, meta = load_model(cfg.init, tokenizer=cfg.tokenizer, tp=tp)
        tok_path = meta["tokenizer_path"]
        if not tok_path:   # best/ bundles the tokenizer's files
            raise MegaGPTError(f"{cfg.init}: checkpoint names no tokenizer; pass --tokenizer")
        if cfg.transfer_layers is not None:
            reinit_after(gpt, cfg.transfer_layers, tp)
    model = FinetuneModel(gpt, task.kind, task.num_outputs, task.regression, cfg.clf_dropout, cfg.lm_coef)
    return model, tok, tok_path


@torch.no_grad()
def reinit_after(gpt, n_transfer: int, tp) -> None:
    """Keep the embeddings and blocks ``0..n_transfer-1`` of a loaded ``gpt``; every other parameter
    (later blocks, a final norm, an untied head) takes the value a freshly initialised model of the
    same config has under the current seed."""
    from megagpt.model import GPT

    n_layer = gpt.cfg.n_layer
    if n_transfer > n_layer:
        raise MegaGPTError(f"transfer_layers={n_transfer} exceeds the checkpoint's {n_layer} layers",
                           key="transfer_layers")
    fresh = dict(GPT(gpt.cfg, tp).named_parameters())
    kept = ("embed.",) + tuple(f"blocks.{i}." for i in range(n_transfer))
    for name, p in gpt.named_parameters():
        if not name.startswith(kept):
            p.copy_(fresh[name])


def encode_examples(task, examples, tok, seq_length):
    sp = SpecialIds.from_tokenizer(tok)
    texts = sorted({t for ex in examples for t in (*ex.texts, *ex.choices)})
    ids = dict(zip(texts, tok.encode_batch(texts))) if texts else {}
    return [(encode(task, ex, ids.__getitem__, sp, seq_length), ex.label) for ex in examples]


def collate(items, pad_id, cls_id, regression):
    seqs = [s for views, _ in items for s in views]
    ids, cls_pos, lm_labels = pad_batch(seqs, pad_id, cls_id)
    labels = torch.tensor([y for _, y in items], dtype=torch.float32 if regression else torch.long)
    return ids, cls_pos, lm_labels, labels


def finetune(cfg: FinetuneConfig, log=None) -> dict:
    """Train and evaluate; returns {"history": [per-epoch metrics], "best": {...}, "best_dir": ...}."""
    cfg.validate()   # before the slow deepspeed import: config mistakes fail fast
    import deepspeed
    from torch.utils.data import DistributedSampler

    from megagpt.parallel.groups import build_parallel_state
    from megagpt.parallel.layout import deepspeed_mpu, seed_all
    from megagpt.parallel.topology import ParallelConfig
    from megagpt.train.distributed import build_ds_config, check_device
    from megagpt.train.optim import param_groups
    from megagpt.train.schedule import Schedule, build_scheduler

    task = get_task(cfg.task)
    init_distributed()
    par = build_parallel_state(ParallelConfig(tensor_parallel=cfg.tensor_parallel, seed=cfg.seed))
    rank, world, dp_group = par.dp_rank, par.dp_size, par.dp_group    # data-parallel replicas
    say = (log or (lambda m: print(m, flush=True))) if dist.get_rank() == 0 else (lambda m: None)
    if cfg.batch_size % world:
        raise MegaGPTError(f"batch_size={cfg.batch_size} must be divisible by the {world} data-parallel replicas",
                           key="batch_size")
    micro = cfg.batch_size // world

    seed_all(cfg.seed)   # same seed on every rank: identical random init and head
    model, tok, tok_path = build_model(cfg, task, par.tp)
    seq_length = cfg.seq_length or model.gpt.cfg.max_seq_len
    if seq_length > model.gpt.cfg.max_seq_len:
        raise MegaGPTError(f"seq_length={seq_length} exceeds the model's max_seq_len={model.gpt.cfg.max_seq_len}",
                           key="seq_length")

    train_ex, eval_ex = task.load(cfg.data_root, cfg.skip_bad, cfg.train_fraction, say)
    train_ex, eval_ex = train_ex[:cfg.train_limit], eval_ex[:cfg.eval_limit]
    if not train_ex or not eval_ex:
        raise MegaGPTError(f"task {task.name}: empty train ({len(train_ex)}) or eval ({len(eval_ex)}) set")
    train_data, eval_data = (encode_examples(task, ex, tok, seq_length) for ex in (train_ex, eval_ex))
    say(f"task {task.name} ({task.kind}): {len(train_data)} train / {len(eval_data)} eval examples, "
        f"seq_length {seq_length}, dp={world} tp={par.tp_size}, init {cfg.init}, lm_coef {cfg.lm_coef}")

    sampler = DistributedSampler(range(len(train_data)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    total = math.ceil(len(sampler) / micro) * cfg.epochs
    zero_stage = 1 if cfg.zero_stage is None and not cfg.deepspeed_config else cfg.zero_stage
    ds_config = build_ds_config(cfg.deepspeed_config, cfg, world, micro_batch_size=micro,
                                global_batch_size=cfg.batch_size, zero_stage=zero_stage, required=False)
    check_device(ds_config, cfg.deepspeed_config)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise MegaGPTError(f"zero_optimization.stage={stage} is not supported for finetuning (0, 1 or 2: the "
                           f"best-checkpoint save reads full parameters on rank 0)", file=cfg.deepspeed_config)
    schedule = Schedule.finetuning(cfg.lr, total, cfg.warmup_frac)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.weight_decay),
                                      lr_scheduler=lambda opt: build_scheduler(opt, schedule), config=ds_config,
                                      mpu=deepspeed_mpu(par))
    sp = SpecialIds.from_tokenizer(tok)
    history, best, best_dir, step = [], None, None, 0
    for epoch in range(1, cfg.epochs + 1):
        engine.train()
        sampler.set_epoch(epoch)
        order = list(sampler)
        t0, losses = time.time(), []
        for i in range(0, len(order), micro):
            ids, cls_pos, lm_labels, labels = collate([train_data[j] for j in order[i:i + micro]],
                                                      sp.pad, sp.cls, task.regression)
            loss, _, parts = engine(ids, cls_pos, lm_labels, labels, batch_size=labels.size(0))
            if not torch.isfinite(loss):
                raise MegaGPTError(f"non-finite loss {loss.item()} at step {step} (epoch {epoch}); "
                                   f"lower --lr or check the data")
            engine.backward(loss)
            engine.step()
            step += 1
            losses.append(loss.item())
            if cfg.log_interval and step % cfg.log_interval == 0:
                say(f"step {step}/{total} loss {loss.item():.4f} task {parts['task'].item():.4f}"
                    + (f" lm {parts['lm'].item():.4f}" if "lm" in parts else "")
                    + f" lr {engine.get_lr()[0]:.3g}")
        result = {"epoch": epoch, "step": step, "train_loss": _mean_across(losses, dp_group),
                  **evaluate(engine.module, task, eval_data, sp, micro, rank, world, dp_group),
                  "epoch_time_s": round(time.time() - t0, 2)}
        history.append(result)
        say("eval " + json.dumps(result))
        if best is None or result[task.main_metric] > best[task.main_metric]:
            best = result
            if cfg.save:
                full = full_state_dict(engine.module)   # collective over the TP group
                if dist.get_rank() == 0:
                    save_best(cfg.save, full, {
                        "task": task.name, "epoch": epoch, "metrics": result, "main_metric": task.main_metric,
                        "finetune_config": cfg.to_dict(), "model": engine.module.gpt.cfg.to_dict(),
                        "head": {"kind": task.kind, "num_outputs": task.num_outputs,
                                 "regression": task.regression}}, tok_path)
                dist.barrier()
                best_dir = os.path.join(cfg.save, "best")
    if cfg.save and dist.get_rank() == 0:
        write_text_atomic(os.path.join(cfg.save, "history.json"),
                          json.dumps({"history": history, "best": best}, indent=2))
    return {"history": history, "best": best, "best_dir": best_dir}


def full_state_dict(model: FinetuneModel) -> dict:
    """GPT + head weights in serial names (the GPT gathered across TP; the head is replicated)."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("gpt.")}
    return {**{f"gpt.{k}": v for k, v in model.gpt.full_state_dict().items()}, **own}


def _mean_across(values: list[float], group) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t[0] / max(t[1], 1))


@torch.no_grad()
def evaluate(model, task, data, sp, micro, rank, world, group=None) -> dict:
    """Loss and metrics on the whole eval set: contiguous slices per data-parallel replica
    (``rank`` of ``world`` in ``group``), gathered to every rank."""
    model.eval()
    lo, hi = rank * len(data) // world, (rank + 1) * len(data) // world
    preds, labels, loss_sum = [], [], 0.0
    for i in range(lo, hi, micro):
        ids, cls_pos, _, y = collate(data[i:min(i + micro, hi)], sp.pad, sp.cls, task.regression)
        _, out, parts = model(ids, cls_pos, None, y, batch_size=y.size(0))   # task loss only
        loss_sum += parts["task"].item() * y.size(0)
        preds += model.predict(out).tolist()
        labels += y.tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, (preds, labels, loss_sum), group=group)
    model.train()
    dtype = np.float64 if task.regression else np.int64   # the STS-B head predicts the 0..5 score directly
    preds = np.asarray([p for g in gathered for p in g[0]], dtype)
    labels = np.asarray([y for g in gathered for y in g[1]], dtype)
    return {"eval_loss": sum(g[2] for g in gathered) / len(labels), "eval_examples": len(labels),
            **metrics.compute(task.metric_kind, preds, labels)}
