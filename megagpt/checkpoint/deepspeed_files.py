"""DeepSpeed checkpoint files (any ZeRO stage, any TP/PP layout) → one full serial-named state dict.

* ZeRO 1-3 without TP/PP: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges every
  rank's fp32 master partitions (ZeRO-3's module files hold only placeholders).
* ZeRO-0: the module state (bf16/fp16 runs: its half copy, with a warning: the fp32 masters are unnamed).
* TP/PP: the module files' TP slices merged, pipeline layer files named back (bf16/fp16: the rounded copy).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import torch

from megagpt.errors import MegaGPTError
from megagpt.model.sharding import check_tp, merge, pipeline_layer_prefixes

log = logging.getLogger("megagpt.checkpoint")
_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")


@contextlib.contextmanager
def deepspeed_output_to_log():
    """What DeepSpeed prints while reading checkpoints (progress bars, its first-import notice) goes to this
    module's log at INFO, so ``--quiet`` (WARNING) sees none of it; DeepSpeed's logger keeps its errors."""
    buf = io.StringIO()
    ds_logger = logging.getLogger("DeepSpeed")   # created before DeepSpeed's first import configures it

    def keep(record):
        return record.levelno >= logging.ERROR or log.isEnabledFor(logging.INFO)

    ds_logger.addFilter(keep)
    try:
        import deepspeed  # noqa: F401  (first import here, not below: its log handler keeps the real stdout)

        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    finally:
        ds_logger.removeFilter(keep)
        for line in buf.getvalue().splitlines():
            if line.rsplit("\r", 1)[-1].strip():   # a progress bar's last redraw only
                log.info("%s", line.rsplit("\r", 1)[-1])


def _load(path):
    try:
        with deepspeed_output_to_log():
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise MegaGPTError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_client_state(tag_dir) -> tuple[dict, Path]:
    """Rank 0's model-states dict (DeepSpeed keeps client_state keys at its top level) and its path."""
    tag_dir = Path(tag_dir)
    # mp_rank_00_model_states.pt, else (ZeRO-3) zero_pp_rank_0_mp_rank_00_...: each sorts first
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise MegaGPTError(f"{tag_dir}: no mp_rank_00_model_states.pt (incomplete DeepSpeed checkpoint?)")
    return _load(files[0]), files[0]


def model_config_of(client: dict, where):
    """The ModelConfig in a client state's ``config["model"]``."""
    from megagpt.model import ModelConfig

    cfg = client.get("config")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise MegaGPTError(f"{where}: client state has no config['model'] (not a megagpt pretraining checkpoint)")
    try:
        return ModelConfig.from_dict(model)
    except MegaGPTError as e:
        raise MegaGPTError(f"{where}: config['model']: {e}") from None


def read_weights(ckpt_dir, tag: str, client: dict, cfg) -> dict:
    """The full state dict of one tag (names as DeepSpeed stored them: normalise before use)."""
    tag_dir = Path(ckpt_dir) / tag
    if list(tag_dir.glob("layer_*-model_states.pt")) or list(tag_dir.glob("*mp_rank_01_model_states.pt")):
        return merge_model_parallel(tag_dir, cfg)
    stage = int(((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    if stage == 0:
        sd = client.get("module") or {}
        half = sorted({str(v.dtype) for v in sd.values() if v.dtype in (torch.bfloat16, torch.float16)})
        if half:
            log.warning("%s: ZeRO-0 %s checkpoint: reading the module's %s weights (fp32 masters are "
                        "recoverable by name only from ZeRO >= 1 checkpoints)", tag_dir, "/".join(half), "/".join(half))
        return sd
    log.info("merging the ZeRO-%d partitions of %s", stage, tag_dir)
    try:
        with deepspeed_output_to_log():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise MegaGPTError(f"{tag_dir}: cannot merge the ZeRO partitions ({type(e).__name__}: {e})") from None


def merge_model_parallel(tag_dir, cfg) -> dict:
    """Full state dict from the module files of a TP and/or PP layout (any DP)."""
    tag_dir = Path(tag_dir)
    layer_files = sorted(tag_dir.glob("layer_*-model_states.pt"))
    if layer_files:
        return _merge_pipeline(layer_files, cfg)
    mp_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not mp_files:   # ZeRO-3 names them zero_pp_rank_*_mp_rank_*: module entries are placeholders
        raise MegaGPTError(f"{tag_dir}: tensor-parallel ZeRO-3 checkpoints hold no module weights; consolidate "
                           "from the live engine (megagpt.checkpoint.consolidated.save_consolidated_from_engine)")
    shards = [_load(f)["module"] for f in mp_files]
    check_tp(cfg, len(shards))
    return {k: merge(k, [s[k] for s in shards], cfg).clone() for k in shards[0]}


def _merge_pipeline(layer_files, cfg) -> dict:
    by_layer = {}
    for f in layer_files:
        m = _LAYER_FILE.search(f.name)
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
            if name not in full:   # the tied table is stored by its first and last stage
                full[name] = merge(name, [s[k] for s in shards], cfg).clone()
    return full
