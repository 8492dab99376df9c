"""Checkpoint formats and conversions: DeepSpeed (any ZeRO stage) → consolidated ⇄ HF transformers.

``consolidated`` (the one unsharded format), ``deepspeed_ckpt`` (DeepSpeed → consolidated),
``convert`` (consolidated ⇄ HF, ``load_model``, format detection), ``hf_gpt2`` / ``hf_openai_gpt`` /
``hf_llama`` (name tables), ``hf_tokenizer``. See docs/export.md. Submodules import torch and
transformers lazily, so importing this package stays cheap.
"""

_LAZY = {"load_model": "convert", "consolidated_to_hf": "convert",
         "hf_to_consolidated": "convert", "deepspeed_to_consolidated": "deepspeed_ckpt",
         "save_consolidated": "consolidated", "load_consolidated": "consolidated"}


def __getattr__(name):  # ``from megagpt.export import load_model`` without importing torch eagerly
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
