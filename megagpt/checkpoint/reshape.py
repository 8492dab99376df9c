"""Checkpoint reshaping: weights and (live engines, ZeRO 0-2) Adam state from any layout to any
layout, through full serial-named tensors (the consolidated format).

Offline, a DeepSpeed checkpoint of any TP/PP/DP layout is read by ``load.open_checkpoint``
(``consolidate_deepspeed_checkpoint`` below); live engines are gathered and re-split here.
"""
from pathlib import Path

import torch

from megagpt.atomic import write_bytes_atomic
from megagpt.errors import MegaGPTError
from megagpt.model.sharding import shard

from .consolidated import save_consolidated
from .load import open_checkpoint


def consolidate_deepspeed_checkpoint(ckpt_dir, tag=None):
    """(full serial-named state dict, ModelConfig) of a DeepSpeed checkpoint written at any TP/PP/DP
    layout: the module weights, exact for fp32 training (see ``deepspeed_files``). Weights only."""
    src = open_checkpoint(ckpt_dir, tag, tokenizer=False)
    return src.state_dict(), src.cfg


def load_consolidated_into(model, ckpt_dir, tag=None) -> dict:
    """Re-split a checkpoint (consolidated, or any format ``open_checkpoint`` reads) into a model
    of any layout (serial, TP, pipeline). Returns its meta (with "step"). Weights only: the
    optimizer starts fresh unless ``load_optimizer_state`` follows."""
    from megagpt.parallel.layout import load_full_state_dict

    src = open_checkpoint(ckpt_dir, tag, tokenizer=False)
    load_full_state_dict(getattr(model, "module", model), src.state_dict())
    return src.meta()


def _on_rank0(write):
    """``write()`` on rank 0 (or in a plain process), then a barrier: its result on rank 0, None elsewhere."""
    import torch.distributed as dist

    out = write() if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return out


def save_consolidated_from_engine(engine_or_model, out_dir, cfg, tokenizer_path=None, run_config=None,
                                  step=None, force=False):
    """Gather a live model/engine of any layout (collective: call on every rank); rank 0 writes."""
    from megagpt.parallel.layout import full_state_dict

    full = full_state_dict(engine_or_model)
    return _on_rank0(lambda: save_consolidated(out_dir, full, cfg, tokenizer_path, run_config, step, force))


# ---- optimizer state (Adam moments) across layouts: live engines, ZeRO 0/1/2 -------------------

OPTIMIZER_FILE = "optimizer.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_optimizer(engine):
    """(stage, the torch optimizer holding Adam's state), refusing what cannot be reshaped."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise MegaGPTError("optimizer-state reshaping supports ZeRO stage 0-2; for stage 3 reshape weights "
                           "only (the optimizer starts fresh)")
    opt = engine.optimizer
    base = opt if isinstance(opt, torch.optim.Optimizer) and stage == 0 else getattr(opt, "optimizer", None)
    adam = (torch.optim.Adam, torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam)
    if not isinstance(base, adam) or base.defaults.get("amsgrad"):
        raise MegaGPTError(f"optimizer-state reshaping supports Adam/AdamW (no amsgrad), not {type(base).__name__}")
    return stage, base


def _layout(module):
    """(TPContext, ModelConfig) of a GPT or a pipeline stage module."""
    par = getattr(module, "parallel_state", None)
    return (par.tp if par is not None else module.tp), module.cfg


def _step_of(base) -> int:
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


@torch.no_grad()
def gather_optimizer_state(engine) -> tuple:
    """({"exp_avg.<serial name>": full tensor, "exp_avg_sq.<...>", "fp32.<...>" (master weight)}, step)
    of a live engine at any TP/PP/DP layout (collective: call on every rank; all get the result)."""
    from megagpt.model.gpt import gather_slices
    from megagpt.model.pipeline import gather_stages
    from megagpt.parallel.layout import named_parameters_serial

    stage, base = _zero_optimizer(engine)
    module = engine.module
    tp, cfg = _layout(module)
    out = {}
    for key in _MOMENTS + ("fp32",):
        local = {}
        for name, p in named_parameters_serial(module):
            if stage == 0:
                t = p if key == "fp32" else (base.state[p][key] if p in base.state else torch.zeros_like(p))
            elif key == "fp32":   # the fp32 master (differs from the module weight under bf16/fp16)
                from deepspeed.utils import safe_get_full_fp32_param

                t = safe_get_full_fp32_param(p)
            else:
                from deepspeed.utils import safe_get_full_optimizer_state

                t = safe_get_full_optimizer_state(p, key)
            local[name] = t.detach().float()
        out.update({f"{key}.{n}": v for n, v in gather_slices(local, cfg, tp).items()})   # across TP
    par = getattr(module, "parallel_state", None)
    if par is not None and par.pp_size > 1:
        out = gather_stages(out, par)
    return out, _step_of(base)


def save_optimizer_state(out_dir, moments: dict, step: int) -> Path:
    """Write ``optimizer.safetensors`` into a consolidated checkpoint dir (published atomically)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in moments.items()}, metadata={"step": str(step)})
    return write_bytes_atomic(Path(out_dir) / OPTIMIZER_FILE, data)


@torch.no_grad()
def load_optimizer_state(engine, ckpt_dir) -> int:
    """Re-split ``optimizer.safetensors`` of a consolidated checkpoint into a freshly initialised
    engine of any layout (ZeRO 0-2, Adam/AdamW), before its first step. Returns the step count."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file():
        raise MegaGPTError(f"{ckpt_dir}: no {OPTIMIZER_FILE} (weights-only checkpoint: the optimizer starts fresh)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
    set_optimizer_state(engine, load_file(str(path)), step, where=str(path))
    return step


@torch.no_grad()
def set_optimizer_state(engine, full: dict, step: int, where: str) -> None:
    """Give a live engine (ZeRO 0-2, any layout) Adam's state from full serial-named tensors
    (``exp_avg.<name>``, ``exp_avg_sq.<name>`` and, when present, the fp32 master ``fp32.<name>``,
    which also becomes the module weight), as if it had taken ``step`` steps."""
    from megagpt.parallel.layout import named_parameters_serial

    stage, base = _zero_optimizer(engine)
    module = engine.module
    state, _ = _layout(module)
    named = named_parameters_serial(module)
    missing = [f"{k}.{n}" for n, _ in named for k in _MOMENTS if f"{k}.{n}" not in full]
    if missing:
        raise MegaGPTError(f"{where}: no optimizer state for {missing[:3]} (saved for another model?)")
    # create Adam's state as its first step would, then overwrite it (FusedAdam counts steps in ints)
    holders = (engine.optimizer.single_partition_of_fp32_groups if stage > 0
               else [p for grp in base.param_groups for p in grp["params"]])
    count = step if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)) else torch.tensor(float(step))
    for hp in holders:
        base.state[hp] = {"step": count, "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
    for grp in base.param_groups:
        if "step" in grp:
            grp["step"] = step
    if stage > 0:
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for name, p in named:
        for key in _MOMENTS + ("fp32",):
            if f"{key}.{name}" not in full:
                continue
            local = shard(name, full[f"{key}.{name}"], state.rank, state.size, module.cfg).to(p.device)
            if local.shape != p.shape:
                raise MegaGPTError(f"{where}: {key}.{name} slice {tuple(local.shape)} does not fit {tuple(p.shape)}")
            if key == "fp32":
                p.data.copy_(local)
                if stage > 0:
                    safe_set_full_fp32_param(p, local.float())
            elif stage == 0:
                base.state[p][key].copy_(local)
            else:
                safe_set_full_optimizer_state(p, local, key)


def save_consolidated_with_optimizer(engine, out_dir, cfg, tokenizer_path=None, run_config=None, step=None,
                                     force=False):
    """Weights (consolidated format) plus Adam moments and step (``optimizer.safetensors``) of a live
    engine, any layout (collective; rank 0 writes). Resume at another layout with
    ``load_consolidated_into(model, out_dir)`` before ``deepspeed.initialize`` and
    ``load_optimizer_state(engine, out_dir)`` after it."""
    out = save_consolidated_from_engine(engine, out_dir, cfg, tokenizer_path, run_config, step, force)
    moments, opt_step = gather_optimizer_state(engine)
    _on_rank0(lambda: save_optimizer_state(out_dir, moments, opt_step))
    return out
