"""Where finetuning starts (pretrained checkpoint or random init) and where its best model goes.

Pretrained inits accepted by ``load_pretrained``:
  * a consolidated megagpt checkpoint dir (``config.json`` + ``model.safetensors``);
  * a DeepSpeed pretraining checkpoint dir (``latest`` + ``global_stepN/``): merged in memory by
    ``megagpt.export.deepspeed_ckpt.load_deepspeed`` (DeepSpeed's own
    ``get_fp32_state_dict_from_zero_checkpoint`` for ZeRO partitions); the model config and
    tokenizer spec come from the client state the pretraining loop saved (``config``, ``tokenizer``).

The best finetuned model is written by rank 0 to ``<save_dir>/best`` through a temporary sibling
directory that is renamed into place only when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError


def _model_config_from(d: dict, where: str):
    from megagpt.model import ModelConfig

    cfg = d.get("model", d) if isinstance(d, dict) else None
    if not isinstance(cfg, dict):
        raise MegaGPTError(f"{where}: no model config found (expected a 'model' dict)")
    return ModelConfig.from_dict(cfg)


def _strip_prefix(sd: dict, model) -> dict:
    """DeepSpeed may save the module under a wrapper name; keep only keys GPT knows."""
    want = set(model.state_dict())
    if set(sd) >= want - {"lm_head.weight"}:
        return sd
    for prefix in ("module.", "model.", "gpt."):
        cut = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if cut and set(cut) >= want - {"lm_head.weight"}:
            return cut
    return sd


def _load_weights(model, sd: dict, where: str) -> None:
    sd = _strip_prefix(sd, model)
    if model.cfg.tie_embeddings:   # tied: either key may be missing from a saved dict
        tok = sd.get("embed.tok.weight", sd.get("lm_head.weight"))
        if tok is not None:
            sd = {**sd, "embed.tok.weight": tok, "lm_head.weight": tok}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MegaGPTError(f"{where}: weights do not match the model config "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def load_pretrained(path):
    """A pretrained checkpoint dir → (GPT with its weights, tokenizer path or None)."""
    from megagpt.model import GPT

    p = Path(path)
    if not p.is_dir():
        raise MegaGPTError(f"{p}: pretrained checkpoint not found (expected a directory)")
    if (p / "config.json").is_file():
        from megagpt.export.consolidated import load_consolidated, tokenizer_path_in

        sd, meta = load_consolidated(p)
        model = GPT(_model_config_from(meta, str(p / "config.json")))
        _load_weights(model, sd, str(p))
        return model, tokenizer_path_in(p)
    from megagpt.export.deepspeed_ckpt import is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(p):
        return _load_deepspeed(p)
    raise MegaGPTError(f"{p}: neither a consolidated checkpoint (config.json) nor a DeepSpeed "
                       f"checkpoint (latest + global_stepN/)")


def _load_deepspeed(p: Path):
    """Merged with megagpt.export.deepspeed_ckpt (ZeRO 0-3 via DeepSpeed's zero_to_fp32, TP/PP via
    reshape; model config and tokenizer spec from the pretraining client state)."""
    from megagpt.export.deepspeed_ckpt import load_deepspeed
    from megagpt.model import GPT

    sd, states, _ = load_deepspeed(p)
    model = GPT(_model_config_from(states["config"], str(p)))
    _load_weights(model, sd, str(p))
    spec = states.get("tokenizer") or {}
    return model, spec.get("path")


def save_best(save_dir, model, info: dict, tokenizer_path=None) -> Path:
    """Atomically replace ``<save_dir>/best`` with the finetuned model (GPT + head) and ``info``."""
    from safetensors.torch import save_file

    out = Path(save_dir) / "best"
    with atomic_dir(out, force=True) as tmp:
        # clone: safetensors refuses tensors that share storage (tied embeddings)
        tensors = {k: v.detach().float().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2, default=str))
        if tokenizer_path:
            src = Path(tokenizer_path)
            if src.is_file():
                shutil.copyfile(src, tmp / "tokenizer.model")
            else:
                shutil.copytree(src, tmp / "tokenizer")
    return out


def load_finetuned(path):
    """``<save_dir>/best`` → (state_dict, info) as written by ``save_best``."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "model.safetensors").is_file() or not (p / "finetune.json").is_file():
        raise MegaGPTError(f"{p}: not a finetuned checkpoint (needs model.safetensors and finetune.json)")
    return load_file(str(p / "model.safetensors")), json.loads((p / "finetune.json").read_text())
