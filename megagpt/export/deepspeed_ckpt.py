"""DeepSpeed pretraining checkpoint (any ZeRO stage) → consolidated megagpt checkpoint.

Weights: DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` merges the fp32 master
partitions of ZeRO 1/2/3 (for ZeRO-3 the module files hold only placeholders). Without ZeRO
(stage 0) there are no partitions: the module state in ``mp_rank_00_model_states.pt`` is the model.
Tensor/pipeline-parallel layouts (``mp_rank_01_*``, ``layer_*-model_states.pt``) are merged by
``megagpt.checkpoint.reshape``. Config and tokenizer come from the client state the pretraining
loop saves beside the module (``config`` = full megagpt config, ``tokenizer`` = spec).
"""
from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

import torch

from megagpt.errors import MegaGPTError

log = logging.getLogger("megagpt.export")
_TAG = re.compile(r"^global_step(\d+)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def is_deepspeed_checkpoint(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(_TAG.match(q.name) for q in p.glob("global_step*")))


def resolve_tag(ckpt_dir, tag: str | None = None) -> str:
    """``tag`` checked to exist, else ``latest``, else the highest complete ``global_stepN``."""
    root = Path(ckpt_dir)
    if tag is not None:
        if not (root / tag).is_dir():
            have = sorted(q.name for q in root.glob("global_step*"))
            raise MegaGPTError(f"{root}: no checkpoint tag {tag!r} (found: {', '.join(have) or 'none'})")
    elif (root / "latest").is_file():
        tag = (root / "latest").read_text().strip()
        if not (root / tag).is_dir():
            raise MegaGPTError(f"{root / 'latest'}: names tag {tag!r}, which does not exist")
    else:
        steps = sorted((int(m.group(1)), q.name) for q in root.glob("global_step*") if (m := _TAG.match(q.name)))
        if any((root / name / "complete").exists() for _, name in steps):   # megagpt's saver: whole tags only
            steps = [(n, name) for n, name in steps if (root / name / "complete").exists()]
        if not steps:
            raise MegaGPTError(f"{root}: no 'latest' file and no global_stepN dirs (not a DeepSpeed checkpoint)")
        tag = steps[-1][1]
    # megagpt's saver marks whole tags with `complete`; a tag without it beside ones with it is half-written
    if not (root / tag / "complete").exists() and any(root.glob("global_step*/complete")):
        raise MegaGPTError(f"{root / tag}: incomplete checkpoint (no 'complete' marker; the run died while saving)")
    return tag


def read_client_state(tag_dir: Path) -> tuple[dict, Path]:
    """The rank-0 model-states dict (DeepSpeed stores client_state keys at its top level)."""
    files = sorted(glob.glob(str(tag_dir / "*mp_rank_00_model_states.pt")))
    plain = tag_dir / "mp_rank_00_model_states.pt"
    path = plain if plain.is_file() else (Path(files[0]) if files else None)
    if path is None:
        raise MegaGPTError(f"{tag_dir}: no mp_rank_00_model_states.pt (incomplete DeepSpeed checkpoint?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False), path
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise MegaGPTError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _model_config(states: dict, where: Path):
    from megagpt.model import ModelConfig

    cfg = states.get("config")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise MegaGPTError(f"{where}: client state has no config['model'] (not a megagpt pretraining checkpoint)")
    try:
        return ModelConfig.from_dict(model)
    except MegaGPTError as e:
        raise MegaGPTError(f"{where}: config['model']: {e}") from None


def _zero_stage(states: dict) -> int:
    ds = states.get("ds_config") or {}
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _restore_names(sd: dict, cfg, where: str) -> dict:
    """Strip wrapper prefixes; re-add the tied name DeepSpeed may have kept only once; check shapes."""
    from megagpt.model import GPT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and not set(sd) & set(shapes):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if cfg.tie_embeddings:
        tok = sd.get("embed.tok.weight", sd.get("lm_head.weight"))
        if tok is not None:
            sd = {**sd, "embed.tok.weight": tok, "lm_head.weight": tok}
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    wrong = [k for k in shapes if k in sd and tuple(sd[k].shape) != tuple(shapes[k])]
    if missing or unexpected or wrong:
        raise MegaGPTError(f"{where}: weights do not match the saved model config (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]})")
    return {k: sd[k].to(torch.float32) for k in shapes}


def load_deepspeed(ckpt_dir, tag: str | None = None) -> tuple[dict, dict, int | None]:
    """(full fp32 state dict in GPT names, client state, step) of one checkpoint tag."""
    root = Path(ckpt_dir)
    tag = resolve_tag(root, tag)
    tag_dir = root / tag
    states, states_path = read_client_state(tag_dir)
    cfg = _model_config(states, states_path)
    tp_or_pp = list(tag_dir.glob("layer_*-model_states.pt")) + list(tag_dir.glob("*mp_rank_01_model_states.pt"))
    if tp_or_pp:
        from megagpt.checkpoint.reshape import consolidate_deepspeed_checkpoint

        sd, _ = consolidate_deepspeed_checkpoint(root, tag=tag, model_cfg=cfg)
    elif _zero_stage(states) == 0:
        sd = states.get("module") or {}
        half = sorted({str(v.dtype) for v in sd.values() if v.dtype in (torch.bfloat16, torch.float16)})
        if half:   # the fp32 masters are flattened per optimizer group, with no names recorded
            log.warning("%s: ZeRO-0 %s checkpoint: exporting the module's %s weights (fp32 masters are "
                        "recoverable by name only from ZeRO >= 1 checkpoints)", tag_dir, "/".join(half), "/".join(half))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        log.info("merging ZeRO-%d partitions of %s", _zero_stage(states), tag_dir)
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise MegaGPTError(f"{tag_dir}: cannot merge the ZeRO partitions ({type(e).__name__}: {e})") from None
    step = states.get("step")
    if step is None and (m := _TAG.match(tag)):
        step = int(m.group(1))
    return _restore_names(dict(sd), cfg, str(tag_dir)), states, step


def deepspeed_to_consolidated(ckpt_dir, out, tag: str | None = None, force: bool = False,
                              tokenizer_path: str | None = None) -> Path:
    """Write the consolidated checkpoint of a DeepSpeed checkpoint dir (tokenizer from its client state,
    or ``tokenizer_path`` when given/when the recorded path has moved)."""
    from .consolidated import save_consolidated

    if Path(out).exists() and not force:
        raise MegaGPTError(f"{out}: already exists; pass --force to overwrite")
    sd, states, step = load_deepspeed(ckpt_dir, tag)
    config = states.get("config")
    if tokenizer_path is None:
        spec = states.get("tokenizer") or {}
        tokenizer_path = spec.get("path")
        if tokenizer_path and not Path(tokenizer_path).exists():
            raise MegaGPTError(f"{ckpt_dir}: the checkpoint's tokenizer {tokenizer_path} no longer exists; "
                               f"pass --tokenizer PATH")
        if not tokenizer_path:
            log.warning("%s: client state names no tokenizer; the consolidated checkpoint will have none", ckpt_dir)
    from megagpt.model import ModelConfig

    model_dict = ModelConfig.from_dict(config["model"]).to_dict()  # validated by load_deepspeed
    return save_consolidated(out, sd, model_dict, tokenizer_path=tokenizer_path, run_config=config,
                             step=step, force=force)
