"""The one entry for every layout: build the model for this rank, fit the DeepSpeed config to the
layout, take a training step, and move full (serial-named) weights in and out of any layout.

    tp=pp=1    GPT(cfg)                    the serial model
    tp>1       GPT(cfg, par.tp)            the same class, split layers (megagpt/tp)
    pp>1       build_pipeline(cfg, par)    DeepSpeed PipelineModule of the GPT's own modules

ZeRO: DeepSpeed 0.19.8's PipelineEngine asserts ``zero stage < 2`` ("ZeRO-2 and ZeRO-3 are
incompatible with pipeline parallelism"); ``check_zero_stage`` refuses such configs up front.
"""
import random

import numpy as np
import torch

from megagpt.errors import MegaGPTError
from megagpt.model import GPT
from megagpt.model.pipeline import build_pipeline, load_pipeline, pipeline_full_state_dict, stage_parameters


def seed_all(seed: int) -> None:
    """Python, numpy, torch and accelerator generators, all from ``seed``."""
    from deepspeed.accelerator import get_accelerator

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def build_model(cfg, par, seed: int):
    """This rank's model for ``par``'s layout, with the initial weights of ``seed`` — the same full
    weights at every TP x PP x DP (each rank replays one serial stream, keeping its slices).

    Afterwards every generator is reseeded per data-parallel replica and pipeline stage
    (``seed + 1000 * dp_rank + 100 * pp_rank``) for dropout; TP ranks of a replica share the
    default stream (replicated activations draw the same mask) and differ in the tracker's
    (split activations: attention heads, sequence chunks)."""
    seed_all(seed)
    model = build_pipeline(cfg, par) if par.pp_size > 1 else GPT(cfg, par.tp)
    seed_all(seed + 1000 * par.dp_rank + 100 * par.pp_rank)
    par.rng.reseed(seed + 1000 * par.dp_rank, seed_default=False)
    return model


def check_zero_stage(ds_config: dict, pp_size: int) -> None:
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if pp_size > 1 and stage >= 2:
        raise MegaGPTError(
            f"zero_optimization.stage={stage} cannot be combined with pipeline_parallel={pp_size}: "
            "DeepSpeed's PipelineEngine supports ZeRO stage 0 or 1 only (use stage 1, or pipeline_parallel=1)")


def prepare_ds_config(ds_config: dict, par) -> dict:
    """Check ``ds_config`` against the layout and return a copy with what the layout needs (and
    bf16's ``check_grad_overflow``, on unless the JSON says otherwise: see ``loop.UpdateGuard``).

    With TP inside a pipeline DeepSpeed by default sends each stage boundary's activation (and
    gradient) as 1/TP slices and all-gathers them on the receiver ("pipe_partitioned",
    "grad_partitioned"), which assumes activations are replicated across TP ranks. Under
    sequence parallelism each TP rank holds a different sequence chunk, so both are turned off.
    """
    check_zero_stage(ds_config, par.pp_size)
    cfg = dict(ds_config)
    if (cfg.get("bf16") or {}).get("enabled"):   # ZeRO 1/2 skip a non-finite-gradient update under bf16 too
        cfg["bf16"] = {"check_grad_overflow": True, **cfg["bf16"]}
    if par.pp_size > 1 and par.sequence_parallel:
        pipe = dict(cfg.get("pipeline") or {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key) is True:
                raise MegaGPTError(f"pipeline.{key}=true cannot be used with sequence_parallel "
                                   "(activations differ across tensor-parallel ranks); remove it")
            pipe[key] = False
        cfg["pipeline"] = pipe
    return cfg


def deepspeed_mpu(par):
    """What ``deepspeed.initialize(mpu=...)`` needs: None serially and for pipelines (which bring
    their own grid), else the TP/DP group adapter."""
    return par.mpu if par.tp_size > 1 and par.pp_size == 1 else None


def _unwrap(model):
    return getattr(model, "module", model)      # a DeepSpeed engine, or a model


def load_full_state_dict(model, full_sd) -> None:
    """Load serial-named full weights into a model (or engine) of any layout."""
    model = _unwrap(model)
    if isinstance(model, GPT):
        model.load_full_state_dict(full_sd)
    else:
        load_pipeline(model, full_sd)


def full_state_dict(model) -> dict:
    """Serial-named full weights of a model of any layout (collective over TP/PP groups)."""
    engine, model = model, _unwrap(model)
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:   # parameters are partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return full_state_dict(model)
    return model.full_state_dict() if isinstance(model, GPT) else pipeline_full_state_dict(model)


def named_parameters_serial(model):
    """(serial GPT name, local parameter) pairs for any layout, each parameter once — for rules
    keyed on names (weight-decay groups) that must not depend on the layout."""
    model = _unwrap(model)
    return list(model.named_parameters()) if isinstance(model, GPT) else list(stage_parameters(model).items())


def model_stats(cfg, seq_length: int) -> tuple:
    """(total parameters, training FLOPs per token) of the whole (unsplit) model, for metrics."""
    with torch.device("meta"):
        g = GPT(cfg, init=False)
    return g.num_params(), g.flops_per_token(seq_length)


def train_step(engine, batch_iter, par) -> torch.Tensor:
    """One optimizer step: gradient_accumulation_steps micro-batches of (input_ids, labels).

    Pipeline: DeepSpeed's 1F1B ``train_batch`` (only first/last stages read ``batch_iter``; pass
    None elsewhere). Otherwise forward/backward per micro-batch and one ``step``. Returns the mean
    micro-batch loss (on every rank of the pipeline)."""
    if par.pp_size > 1:
        return engine.train_batch(data_iter=batch_iter if par.needs_data else None)
    losses = []
    for _ in range(engine.gradient_accumulation_steps()):
        input_ids, labels = next(batch_iter)
        loss = engine(input_ids, labels=labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()
