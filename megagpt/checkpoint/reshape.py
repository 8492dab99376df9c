"""Checkpoint reshaping: any DeepSpeed layout -> consolidated (serial names) -> any layout, for
weights and (live engines, ZeRO 0-2) Adam state.
"""
import re
from pathlib import Path

import torch

from megagpt.errors import MegaGPTError
from megagpt.model.sharding import check_tp, merge, pipeline_layer_prefixes, shard, shard_kind

# ---- checkpoint reshaping: any DeepSpeed layout -> consolidated (serial names) -> any layout ----

def _load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated/corrupt files raise many types
        raise MegaGPTError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _model_config(model_states: dict, model_cfg, where):
    from megagpt.model import ModelConfig

    if model_cfg is not None:
        return model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    cfg = (model_states.get("config") or {}).get("model")
    if not isinstance(cfg, dict):
        raise MegaGPTError(f"{where}: no model config in the checkpoint's client state (client_state['config']"
                           "['model']); pass it explicitly (--model-config)")
    return ModelConfig.from_dict(cfg)


def consolidate_deepspeed_checkpoint(ckpt_dir, tag=None, model_cfg=None):
    """Full serial-named state dict of a DeepSpeed checkpoint written at any TP/PP layout (any DP).

    Reads only the model-states files (``mp_rank_XX_model_states.pt``, and for pipelines the
    per-layer ``layer_II-model_TT-model_states.pt``), merging TP slices with ``merge``. These are
    the module weights: exact for fp32 training, the rounded model copy for bf16/fp16 (the fp32
    masters and Adam moments live in the ZeRO optimizer shards, which are not reshaped).
    Returns (state_dict, ModelConfig).
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise MegaGPTError(f"{root}: no such checkpoint directory")
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise MegaGPTError(f"{root}: no 'latest' file; pass the checkpoint tag (e.g. global_step100)")
        tag = latest.read_text().strip()
    d = root / str(tag)
    mp_files = sorted(d.glob("mp_rank_*_model_states.pt"))
    if not mp_files:
        raise MegaGPTError(f"{d}: not a DeepSpeed checkpoint (no mp_rank_*_model_states.pt)")
    first = _load(mp_files[0])
    cfg = _model_config(first, model_cfg, mp_files[0])
    layer_files = sorted(d.glob("layer_*-model_states.pt"))
    if layer_files:
        return _consolidate_pipeline(layer_files, cfg), cfg
    shards = [_load(f)["module"] for f in mp_files]
    check_tp(cfg, len(shards))
    return {k: merge(k, [s[k] for s in shards], cfg).clone() for k in shards[0]}, cfg


def _consolidate_pipeline(layer_files, cfg) -> dict:
    pat = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
    by_layer = {}
    for f in layer_files:
        m = pat.search(f.name)
        if m is None:
            raise MegaGPTError(f"{f}: unexpected pipeline layer file name")
        by_layer.setdefault(int(m.group(1)), {})[int(m.group(2) or 0)] = f
    prefixes = pipeline_layer_prefixes(cfg)
    if max(by_layer) >= len(prefixes):
        raise MegaGPTError(f"{layer_files[0].parent}: layer index {max(by_layer)} does not fit the model config "
                           f"({len(prefixes)} pipeline layers)")
    full = {}
    for idx, files in sorted(by_layer.items()):
        shards = [_load(files[t]) for t in sorted(files)]
        check_tp(cfg, len(shards))
        for k in shards[0]:
            name = prefixes[idx] + k
            if name not in full:
                full[name] = merge(name, [s[k] for s in shards], cfg).clone()
    if cfg.tie_embeddings:
        full["lm_head.weight"] = full["embed.tok.weight"]
    if cfg.pos_emb != "learned":
        full.pop("embed.pos.weight", None)
    return full


def save_consolidated_checkpoint(out_dir, full_sd, cfg, tokenizer_path=None, run_config=None, step=None,
                                 force=False):
    """Write ``full_sd`` with ``megagpt.export.consolidated.save_consolidated`` (checked against cfg first)."""
    from megagpt.export.consolidated import save_consolidated
    from megagpt.model import GPT

    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg, init=False).state_dict().items()}
    got = {k: v.shape for k, v in full_sd.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise MegaGPTError(f"consolidated weights do not match the model config: {diff[:5]}")
    return save_consolidated(out_dir, full_sd, cfg.to_dict(), tokenizer_path=tokenizer_path,
                             run_config=run_config, step=step, force=force)


def load_consolidated_into(model, ckpt_dir) -> dict:
    """Re-split a consolidated checkpoint into a model of any layout (serial, TP, pipeline).
    Returns the checkpoint's meta (config.json). Weights only: the optimizer starts fresh."""
    from megagpt.export.consolidated import load_consolidated

    from megagpt.parallel.layout import load_full_state_dict

    sd, meta = load_consolidated(ckpt_dir)
    load_full_state_dict(getattr(model, "module", model), sd)
    return meta


def save_consolidated_from_engine(engine_or_model, out_dir, cfg, tokenizer_path=None, run_config=None,
                                  step=None, force=False):
    """Gather a live model/engine of any layout (collective: call on every rank); rank 0 writes."""
    import torch.distributed as dist

    from megagpt.parallel.layout import full_state_dict

    full = full_state_dict(engine_or_model)
    out = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = save_consolidated_checkpoint(out_dir, full, cfg, tokenizer_path, run_config, step, force)
    if dist.is_initialized():
        dist.barrier()
    return out


# ---- optimizer state (Adam moments) across layouts: live engines, ZeRO 0/1/2 -------------------

OPTIMIZER_FILE = "optimizer.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_optimizer(engine):
    """(stage, torch optimizer, {local param -> its state holder}) with the supported checks."""
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise MegaGPTError("optimizer-state reshaping supports ZeRO stage 0-2; for stage 3 reshape weights "
                           "only (the optimizer starts fresh)")
    opt = engine.optimizer
    base = opt if isinstance(opt, torch.optim.Optimizer) and stage == 0 else getattr(opt, "optimizer", None)
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)) or base.defaults.get("amsgrad"):
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
    import torch.distributed as dist

    from megagpt.parallel.layout import named_parameters_serial

    stage, base = _zero_optimizer(engine)
    module = engine.module
    state, cfg = _layout(module)
    tp = state.size
    out = {}
    for name, p in named_parameters_serial(module):
        for key in _MOMENTS + ("fp32",):
            if stage == 0:
                local = p if key == "fp32" else (base.state[p][key] if p in base.state else torch.zeros_like(p))
            elif key == "fp32":   # the fp32 master (differs from the module weight under bf16/fp16)
                from deepspeed.utils import safe_get_full_fp32_param

                local = safe_get_full_fp32_param(p)
            else:
                from deepspeed.utils import safe_get_full_optimizer_state

                local = safe_get_full_optimizer_state(p, key)
            local = local.detach().float().contiguous()
            if tp > 1 and shard_kind(name) != "replicated":
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(parts, local, group=state.group)
            else:
                parts = [local]
            out[f"{key}.{name}"] = merge(name, parts, cfg).clone()
    par = getattr(module, "parallel_state", None)
    if par is not None and par.pp_size > 1:
        parts = [None] * par.pp_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in out.items()}, group=par.pp_group)
        out = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return out, _step_of(base)


def save_optimizer_state(out_dir, moments: dict, step: int) -> Path:
    """Write ``optimizer.safetensors`` into a consolidated checkpoint dir (temp name, then rename)."""
    import os

    from safetensors.torch import save_file

    path = Path(out_dir) / OPTIMIZER_FILE
    tmp = path.with_name(f".{OPTIMIZER_FILE}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)
    return path


@torch.no_grad()
def load_optimizer_state(engine, ckpt_dir) -> int:
    """Re-split ``optimizer.safetensors`` of a consolidated checkpoint into a freshly initialised
    engine of any layout (ZeRO 0-2, Adam/AdamW), before its first step. Returns the step count."""
    from safetensors import safe_open

    from megagpt.parallel.layout import named_parameters_serial

    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file():
        raise MegaGPTError(f"{ckpt_dir}: no {OPTIMIZER_FILE} (weights-only checkpoint: the optimizer starts fresh)")
    stage, base = _zero_optimizer(engine)
    module = engine.module
    state, _ = _layout(module)
    tp_rank, tp = state.rank, state.size
    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
        named = named_parameters_serial(module)
        missing = [f"{k}.{n}" for n, _ in named for k in _MOMENTS if f"{k}.{n}" not in f.keys()]
        if missing:
            raise MegaGPTError(f"{path}: no optimizer state for {missing[:3]} (saved for another model?)")
        # create Adam's state as its first step would, then overwrite it
        holders = (engine.optimizer.single_partition_of_fp32_groups if stage > 0
                   else [p for grp in base.param_groups for p in grp["params"]])
        for hp in holders:
            base.state[hp] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(hp),
                              "exp_avg_sq": torch.zeros_like(hp)}
        if stage > 0:
            from deepspeed.utils import safe_set_full_optimizer_state

            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            for key in _MOMENTS:
                local = shard(name, f.get_tensor(f"{key}.{name}"), tp_rank, tp, module.cfg)
                if local.shape != p.shape:
                    raise MegaGPTError(f"{path}: {key}.{name} slice {tuple(local.shape)} does not fit {tuple(p.shape)}")
                if stage == 0:
                    base.state[p][key].copy_(local)
                else:
                    safe_set_full_optimizer_state(p, local.to(p.device), key)
            if stage > 0 and f"fp32.{name}" in f.keys():   # fp32 master, exact under mixed precision
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, shard(name, f.get_tensor(f"fp32.{name}"), tp_rank, tp, module.cfg).to(p.device))
    return step


def save_consolidated_with_optimizer(engine, out_dir, cfg, tokenizer_path=None, run_config=None, step=None,
                                     force=False):
    """Weights (consolidated format) plus Adam moments and step (``optimizer.safetensors``) of a live
    engine, any layout (collective; rank 0 writes). Resume at another layout with
    ``load_consolidated_into(model, out_dir)`` before ``deepspeed.initialize`` and
    ``load_optimizer_state(engine, out_dir)`` after it."""
    import torch.distributed as dist

    out = save_consolidated_from_engine(engine, out_dir, cfg, tokenizer_path, run_config, step, force)
    moments, opt_step = gather_optimizer_state(engine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_optimizer_state(out_dir, moments, opt_step)
    if dist.is_initialized():
        dist.barrier()
    return out
