"""HF transformers interop: full megagpt state dicts ⇄ HF directories.

``hf`` (``hf_target``, ``write_hf``, ``model_config_from_hf``, ``read_hf_weights``), the name
tables ``hf_gpt2`` / ``hf_openai_gpt`` / ``hf_llama`` (with each architecture's config mapping),
``hf_tokenizer`` (tokenizer files both ways). Reading megagpt's own checkpoints, format detection
and conversions live in ``megagpt.checkpoint`` (which imports this package, never the reverse).
See docs/export.md. Submodules import torch and transformers lazily where they can.
"""
