"""Every checkpoint megagpt reads or writes, in one place. See docs/export.md and docs/parallelism.md.

  tags.py             which tag of a DeepSpeed dir to read (``complete`` marker; ``latest`` is a hint)
  engine.py           crash-safe save/resume of a live DeepSpeed engine (pretraining)
  tokenizer_files.py  the tokenizer layout inside checkpoints (``tokenizer/`` + ``spec.json``)
  state_dict.py       one normalisation of loaded weights (wrapper prefixes, tied name, shapes)
  deepspeed_files.py  DeepSpeed files (ZeRO 0-3, TP, PP) → a full serial-named state dict
  consolidated.py     the consolidated format (model.safetensors + config.json + tokenizer/)
  load.py             ``open_checkpoint`` / ``load_model``: any of DeepSpeed, consolidated, HF dirs
  convert.py          DeepSpeed / consolidated / HF → consolidated or HF (tools/convert_checkpoint.py)
  reshape.py          weights and Adam state of live engines across TP/PP/DP layouts

``from megagpt.checkpoint import load_model`` works without importing torch up front.
"""

_LAZY = {"load_model": "load", "open_checkpoint": "load"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
