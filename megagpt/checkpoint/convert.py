"""Conversions: any checkpoint ``load.open_checkpoint`` reads (DeepSpeed at any ZeRO stage and
layout, consolidated, HF) → a consolidated megagpt dir or an HF transformers dir. Read into memory,
then written once to a temporary sibling renamed into place when complete.
"""
from __future__ import annotations

import logging
from pathlib import Path

from megagpt.errors import MegaGPTError

from .consolidated import save_consolidated
from .load import open_checkpoint

log = logging.getLogger("megagpt.checkpoint")
TARGETS = {"consolidated": "consolidated", "megagpt": "consolidated", "hf": "hf"}


def convert(input_path, output_path, to: str, tag: str | None = None, force: bool = False,
            tokenizer: str | None = None, dtype: str = "float32", approximate_gelu: bool = False,
            max_shard_size="5GB") -> Path:
    """Convert ``input_path`` to ``to`` ("consolidated", alias "megagpt", or "hf") at ``output_path``.
    Refusals (existing output, same format, no faithful HF architecture) come before reading weights."""
    from megagpt.export.hf import hf_target, write_hf

    if to not in TARGETS:
        raise MegaGPTError(f"--to {to!r}: must be one of {', '.join(TARGETS)}")
    to = TARGETS[to]
    if Path(output_path).exists() and not force:
        raise MegaGPTError(f"{output_path}: already exists; pass --force to overwrite")
    src = open_checkpoint(input_path, tag, tokenizer)
    if src.format == to:
        raise MegaGPTError(f"{input_path} is already a {to} checkpoint")
    target = hf_target(src.cfg, approximate_gelu) if to == "hf" else None
    if src.tokenizer_path is None:
        log.warning("%s: no tokenizer in the checkpoint; the %s output will have none (pass --tokenizer PATH)",
                    src.where, to)
    sd = src.state_dict()
    if to == "consolidated":
        out = save_consolidated(output_path, sd, src.cfg, tokenizer_path=src.tokenizer_path,
                                run_config=src.run_config, step=src.step, force=force)
    else:
        out = write_hf(output_path, sd, src.cfg, src.tokenizer_path, force=force, dtype=dtype,
                       approximate_gelu=approximate_gelu, max_shard_size=max_shard_size)
    log.info("converted %s (%s, model %s, step %s) to %s (%s)", src.where, src.format, src.cfg.name, src.step, out,
             target.ARCHITECTURE if target else to)
    return Path(out)
