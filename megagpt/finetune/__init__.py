"""GPT-1 finetuning: task readers, input transforms, heads, metrics and the DeepSpeed loop
(docs/finetune.md). deepspeed is imported inside functions, so the rest imports fast."""
