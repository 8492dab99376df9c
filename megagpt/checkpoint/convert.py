"""Conversions: any checkpoint ``load.open_checkpoint`` reads (DeepSpeed at any ZeRO stage and
layout, consolidated, HF) → a consolidated megagpt dir or an HF transformers dir. Read into memory,
then written once to a temporary sibling renamed into place when complete.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from megagpt.errors import MegaGPTError

from .consolidated import save_consolidated
from .load import checked_tokenizer, open_checkpoint

log = logging.getLogger("megagpt.checkpoint")
TARGETS = {"consolidated": "consolidated", "megagpt": "consolidated", "hf": "hf"}


def convert(input_path, output_path, to: str, tag: str | None = None, force: bool = False,
            tokenizer: str | None = None, dtype: str = "float32", approximate_gelu: bool = False,
            max_shard_size="5GB") -> Path:
    """Convert ``input_path`` to ``to`` ("consolidated", alias "megagpt", or "hf") at ``output_path``.
    Refusals (an output that is, is inside or holds the input; an existing output; same format; no faithful
    HF architecture; a tokenizer with fewer ids than the model) come before reading weights."""
    from megagpt.export.hf import hf_target, write_hf

    if to not in TARGETS:
        raise MegaGPTError(f"--to {to!r}: must be one of {', '.join(TARGETS)}")
    to = TARGETS[to]
    _refuse_overlap(input_path, output_path)
    if Path(output_path).exists() and not force:
        raise MegaGPTError(f"{output_path}: already exists; pass --force to overwrite")
    src = open_checkpoint(input_path, tag, tokenizer)
    if src.format == to:
        raise MegaGPTError(f"{input_path} is already a {to} checkpoint")
    target = hf_target(src.cfg, approximate_gelu) if to == "hf" else None
    checked_tokenizer(src, more_ok=True)
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


def _refuse_overlap(input_path, output_path) -> None:
    """The output replaces whatever is at its path (--force): never the input, a folder inside it
    (one of its tags) or a folder holding it — the training run's checkpoints would be gone."""
    src, out = (Path(os.path.realpath(p)) for p in (input_path, output_path))
    how = ("is" if out == src else "is inside" if out.is_relative_to(src) else
           "contains" if src.is_relative_to(out) else None)
    if how:
        raise MegaGPTError(f"--output {output_path}: {how} the --input {input_path}; write the conversion "
                           f"elsewhere (not even --force replaces the input)")
