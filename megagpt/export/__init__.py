"""Checkpoint formats and conversions: DeepSpeed (any ZeRO stage) → consolidated ⇄ HF transformers.

``consolidated`` (the one unsharded format), ``deepspeed_ckpt`` (DeepSpeed → consolidated),
``convert`` (consolidated ⇄ HF, ``load_model``, format detection), ``hf_gpt2`` / ``hf_openai_gpt`` /
``hf_llama`` (name tables), ``hf_tokenizer``. See docs/export.md. Submodules import torch and
transformers lazily, so importing this package stays cheap.
"""
