"""Elastic resume: a pretraining checkpoint continues on another layout (DP, TP, PP or ZeRO stage).

DeepSpeed's ``load_checkpoint`` needs the layout that wrote the files (the same DP for ZeRO
partitions, the same TP/PP for the module files). When the layout differs, the tag is instead
read offline into full serial-named tensors (each parameter's fp32 master and both Adam moments,
cut out of DeepSpeed's flat partitions by the ``param_slice_mappings`` it saves), re-split into
the live engine (``set_optimizer_state``), and the step counters and LR scheduler are set
as DeepSpeed's own load would. The data position (consumed samples) is a global count, so the
sampler continues at the next unseen sample for any DP x micro-batch split of the same global
batch (``engine.check_global_batch`` refuses another global batch).

Exact: every weight, moment and step equals the checkpoint's. The steps that follow differ from
the unmoved run only by reduction order. Not carried: per-rank dropout streams (a new layout has
other ranks; each starts from its seed-derived stream) and an fp16 loss scale (restarts).
Sources and targets of ZeRO stage 0-2; ZeRO-3 partitions each parameter and is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from megagpt.errors import MegaGPTError
from megagpt.model.sharding import merge, pipeline_layer_prefixes, shard

from .deepspeed_files import _load, model_config_of

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def saved_layout(client: dict) -> dict:
    """{"dp", "tp", "pp", "zero"} of the run that wrote ``client`` (a model-states dict)."""
    dims = client.get("checkpoint_parallel_dimensions") or {}
    zero = int(((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    return {"dp": int(client["dp_world_size"]), "tp": int(dims.get("tp_degree", 1)),
            "pp": int(dims.get("pp_degree", 1)), "zero": zero}


def _serial_name(name: str, prefixes: list) -> str:
    """A pipeline stage's parameter name (``3.attn.qkv.weight``, ``tied_modules.tok.weight``) in the GPT."""
    if name.startswith("tied_modules.tok."):
        return "embed.tok." + name[len("tied_modules.tok."):]
    idx, rest = name.split(".", 1)
    return prefixes[int(idx)] + rest


def optimizer_param_names(engine) -> list | None:
    """ZeRO-0 only: [[serial name, ...] per optimizer group] in the optimizer's order — what its
    state_dict numbers 0, 1, ... (DeepSpeed records no names for ZeRO-0). Saved in the client state."""
    if engine.zero_optimization_stage() != 0:
        return None
    from megagpt.parallel.layout import named_parameters_serial

    name = {id(p): n for n, p in named_parameters_serial(engine.module)}
    groups = [[name.get(id(p)) for p in g["params"]] for g in engine.optimizer.param_groups]
    return None if any(None in g for g in groups) else groups   # (a mixed-precision wrapper's own params)


def _mp_rank_states(tag_dir: Path, mp: int, zero: int) -> tuple[dict, int, bool]:
    """({key: {name: tensor}}, step, whether the names are already serial) of model-parallel rank
    ``mp`` (all its DP partitions)."""
    model = _load(tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
    if zero == 0:   # a torch-style optimizer state_dict, numbered in the order optimizer_param_names recorded
        osd, names = model.get("optimizer") or {}, model.get("optimizer_param_names")
        if "state" not in osd or "param_groups" not in osd or names is None:
            raise MegaGPTError(f"{tag_dir}: a ZeRO-0 checkpoint without megagpt's optimizer_param_names (older) or "
                               "not fp32: it resumes only on the layout that saved it")
        ids = [i for g in osd["param_groups"] for i in g["params"]]
        out = {k: {} for k in KEYS}
        for i, name in zip(ids, [n for group in names for n in group]):
            for k in KEYS[1:]:
                out[k][name] = osd["state"][i][k]
        out["fp32"] = dict(model.get("module") or {})   # PP: module weights come from layer files
        return out, max(int(st["step"]) for st in osd["state"].values()), True   # FusedAdam: one param per group
    shapes = {n: s for group in model["param_shapes"] for n, s in group.items()}
    files = sorted((int(m.group(1)), f) for f in tag_dir.glob(f"zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")
                   if (m := _OPTIM_FILE.search(f.name)))
    pieces, step = {}, 0
    for _, f in files:   # data-parallel rank order: a parameter's fragments concatenate to it whole
        osd = _load(f)["optimizer_state_dict"]
        state = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g], **{k: state[g][k] for k in KEYS[1:]}}
            step = int(state[g]["step"])
            for name, frag in mapping.items():
                for k, t in flat.items():
                    pieces.setdefault(k, {}).setdefault(name, []).append(t.detach().narrow(0, frag.start, frag.numel))
    return {k: {n: torch.cat(p).view(shapes[n]) for n, p in by_name.items()} for k, by_name in pieces.items()}, \
        step, False


def read_training_state(tag_dir, client: dict, weights) -> tuple[dict, int]:
    """({"fp32.<serial name>", "exp_avg.<...>", "exp_avg_sq.<...>": full tensor}, Adam step) of a
    tag of any layout. ``weights()``: the tag's full serial-named module weights, read only for
    ZeRO-0, whose fp32 masters a pipeline keeps only in its layer files (ZeRO 1/2 partitions hold
    every master)."""
    tag_dir = Path(tag_dir)
    lay, cfg = saved_layout(client), model_config_of(client, tag_dir)
    if lay["zero"] >= 3:
        raise MegaGPTError(f"{tag_dir}: a ZeRO-3 checkpoint resumes only on the layout that saved it "
                           f"(dp={lay['dp']}, tp={lay['tp']}, pp={lay['pp']}): elastic resume supports ZeRO 0-2")
    prefixes = pipeline_layer_prefixes(cfg)
    slices, step = {}, 0   # (key, serial name) -> {tp rank: local tensor}
    for mp in range(lay["tp"] * lay["pp"]):
        states, step, serial_names = _mp_rank_states(tag_dir, mp, lay["zero"])
        for k, named in states.items():
            for name, t in named.items():
                serial = _serial_name(name, prefixes) if lay["pp"] > 1 and not serial_names else name
                slices.setdefault((k, serial), {}).setdefault(mp % lay["tp"], t)   # tied table: first stage's
    full = {f"{k}.{n}": merge(n, [s[r] for r in sorted(s)], cfg) for (k, n), s in slices.items()}
    for n, w in (weights() if lay["zero"] == 0 else {}).items():
        full.setdefault(f"fp32.{n}", w)
    return full, step


def load_elastic(engine, load_dir, tag: str, client: dict) -> None:
    """Set a live engine (ZeRO 0-2, any layout) to the training state of a tag of another layout."""
    from .deepspeed_files import read_weights
    from .state_dict import normalize_state_dict

    tag_dir = Path(load_dir) / tag
    cfg = model_config_of(client, tag_dir)
    state, step = read_training_state(
        tag_dir, client, lambda: normalize_state_dict(read_weights(load_dir, tag, client, cfg), cfg, str(tag_dir)))
    set_optimizer_state(engine, state, step, where=str(tag_dir))
    engine.global_steps = int(client.get("global_steps", step))
    engine.global_samples = int(client.get("global_samples", 0))
    engine.skipped_steps = int(client.get("skipped_steps", 0))
    if engine.lr_scheduler is not None and client.get("lr_scheduler") is not None:
        load_scheduler_state(engine, client["lr_scheduler"])


def load_scheduler_state(engine, state: dict) -> None:
    """The LR scheduler's state, and the learning rate it implies in each optimizer group (which
    DeepSpeed's own load restores with the optimizer's param groups)."""
    engine.lr_scheduler.load_state_dict(state)
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_optimizer(engine):
    """(stage, the torch optimizer holding Adam's state), refusing what elastic resume cannot fill."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise MegaGPTError("elastic resume supports ZeRO stage 0-2, not this run's stage 3: resume on the "
                           "layout and stage that saved the checkpoint")
    opt = engine.optimizer
    base = opt if isinstance(opt, torch.optim.Optimizer) and stage == 0 else getattr(opt, "optimizer", None)
    adam = (torch.optim.Adam, torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam)
    if not isinstance(base, adam) or base.defaults.get("amsgrad"):
        raise MegaGPTError(f"elastic resume supports Adam/AdamW (no amsgrad), not {type(base).__name__}")
    return stage, base


def _layout(module):
    """(TPContext, ModelConfig) of a GPT or a pipeline stage module."""
    par = getattr(module, "parallel_state", None)
    return (par.tp if par is not None else module.tp), module.cfg


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
