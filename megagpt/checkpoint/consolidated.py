"""The consolidated megagpt checkpoint: the one unsharded format every conversion can go through.

A directory (published by ``atomic_dir``: a crash never leaves one that looks finished) holding
  model.safetensors      full state dict in ``megagpt.model.GPT`` parameter names, fp32
  config.json            {"format": "megagpt-consolidated", "version": 1, "model": ModelConfig dict,
                          "megagpt": full run config (optional), "step": int or null}
  tokenizer/             the tokenizer files and ``spec.json`` (layout: ``tokenizer_files``)
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError
from megagpt.export.hf import write_safetensors

from .state_dict import normalize_state_dict
from .tokenizer_files import write_tokenizer

FORMAT = "megagpt-consolidated"
VERSION = 1


def save_consolidated(out_dir, state_dict: dict, model_config, tokenizer_path=None,
                      run_config: dict | None = None, step: int | None = None, force: bool = False) -> Path:
    """Write a consolidated checkpoint; ``model_config``: a ModelConfig or its dict, checked against the weights."""
    from megagpt.model import ModelConfig

    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
    sd = normalize_state_dict(state_dict, cfg, f"{out_dir}: weights to save")
    with atomic_dir(Path(out_dir), force) as tmp:
        write_safetensors(sd, tmp / "model.safetensors", {"format": FORMAT})
        meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), "megagpt": run_config, "step": step}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_path is not None:
            write_tokenizer(tokenizer_path, tmp / "tokenizer")
    return Path(out_dir)


def is_consolidated(path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def read_meta(ckpt_dir) -> dict:
    """config.json of a consolidated checkpoint, validated, without reading the weights."""
    d = Path(ckpt_dir)
    cfg, weights = d / "config.json", d / "model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise MegaGPTError(f"{d}: not a consolidated megagpt checkpoint (needs config.json and model.safetensors)")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise MegaGPTError(f"{cfg}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise MegaGPTError(f"{cfg}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise MegaGPTError(f"{cfg}: version {meta.get('version')} is not supported (expected {VERSION})")
    return meta


def load_consolidated(ckpt_dir) -> tuple[dict, dict]:
    """(state_dict as stored, config.json); most callers want ``load.load_model`` (checked, normalised)."""
    meta = read_meta(ckpt_dir)
    return load_file(str(Path(ckpt_dir) / "model.safetensors")), meta


def save_consolidated_from_engine(engine_or_model, out_dir, cfg, tokenizer_path=None, run_config=None,
                                  step=None, force=False):
    """Gather a live model/engine of any layout (collective: call on every rank); rank 0 writes and
    gets the path, the others None."""
    import torch.distributed as dist

    from megagpt.parallel.layout import full_state_dict

    full = full_state_dict(engine_or_model)
    out = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = save_consolidated(out_dir, full, cfg, tokenizer_path, run_config, step, force)
    if dist.is_initialized():
        dist.barrier()
    return out
