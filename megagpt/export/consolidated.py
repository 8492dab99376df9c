"""The consolidated megagpt checkpoint: the one unsharded format every conversion passes through.

A directory holding
  model.safetensors   full (un-sharded) state dict in ``megagpt.model.GPT`` parameter names, fp32
  config.json         {"format": "megagpt-consolidated", "version": 1, "model": ModelConfig dict,
                       "megagpt": full run config (optional), "step": int or null}
  tokenizer/          the tokenizer files (sentencepiece ``tokenizer.model``, or GPT-2
                      ``encoder.json`` + ``vocab.bpe``) and ``spec.json``

DeepSpeed (any ZeRO stage, any TP/PP layout) → consolidated → HF transformers, and back. Writes go
to a temporary sibling directory renamed into place when complete, so a crash never leaves a
directory that looks like a finished checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError

FORMAT = "megagpt-consolidated"
VERSION = 1


def _copy_tokenizer(tokenizer_path, dest: Path) -> None:
    """Copy a sentencepiece .model file or a GPT-2 BPE directory into ``dest``."""
    src = Path(tokenizer_path)
    dest.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, dest / "tokenizer.model")
        spec = {"type": "sentencepiece", "file": "tokenizer.model"}
    elif (src / "encoder.json").is_file() and (src / "vocab.bpe").is_file():
        shutil.copyfile(src / "encoder.json", dest / "encoder.json")
        shutil.copyfile(src / "vocab.bpe", dest / "vocab.bpe")
        spec = {"type": "gpt2-bpe", "dir": "."}
    else:
        raise MegaGPTError(f"{src}: not a sentencepiece .model file nor a dir with encoder.json + vocab.bpe")
    (dest / "spec.json").write_text(json.dumps(spec, indent=2))


def tokenizer_path_in(ckpt_dir) -> str | None:
    """Path to hand to ``megagpt.tokenizer.load_tokenizer`` for a consolidated checkpoint."""
    tdir = Path(ckpt_dir) / "tokenizer"
    if (tdir / "tokenizer.model").is_file():
        return str(tdir / "tokenizer.model")
    if (tdir / "encoder.json").is_file():
        return str(tdir)
    return None


def save_consolidated(out_dir, state_dict: dict, model_config: dict, tokenizer_path=None,
                      run_config: dict | None = None, step: int | None = None, force: bool = False) -> Path:
    out = Path(out_dir)
    with atomic_dir(out, force) as tmp:
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()}
        # safetensors refuses shared storage (tied embeddings): store each name's own copy.
        tensors = {k: v.clone() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": VERSION, "model": model_config,
                "megagpt": run_config, "step": step}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_path is not None:
            _copy_tokenizer(tokenizer_path, tmp / "tokenizer")
    return out


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
    """Return (state_dict, meta) where meta is config.json (``meta["model"]`` is the ModelConfig dict)."""
    meta = read_meta(ckpt_dir)
    return load_file(str(Path(ckpt_dir) / "model.safetensors")), meta
