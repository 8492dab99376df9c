"""GPT-1 finetuning: task readers, input transforms, heads, metrics and the DeepSpeed loop.

See docs/finetune.md. Heavy imports (deepspeed) stay inside ``loop``/``checkpoint`` functions so
the readers, transforms and metrics import fast.
"""
