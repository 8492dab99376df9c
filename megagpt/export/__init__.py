"""HF transformers interop: full megagpt state dicts ⇄ HF directories (``hf``), one name table and
config mapping per architecture (``hf_gpt2``, ``hf_openai_gpt``, ``hf_llama``), tokenizer files
(``hf_tokenizer``). ``megagpt.checkpoint`` imports this package, never the reverse (docs/export.md)."""
