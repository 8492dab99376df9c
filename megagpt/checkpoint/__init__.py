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
"""


def __getattr__(name):   # lazy: ``from megagpt.checkpoint import load_model`` does not import torch up front
    if name in ("load_model", "open_checkpoint"):
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
