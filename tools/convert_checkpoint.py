#!/usr/bin/env python
"""Convert checkpoints: a DeepSpeed pretraining checkpoint (any ZeRO stage, any tensor/pipeline-parallel
layout) → consolidated megagpt (serial names: loads at any layout) or HF transformers; consolidated → HF;
HF transformers (GPT-2, OpenAI GPT, Llama) → consolidated megagpt. Mappings, refusals: docs/export.md.

The input type is detected (for a DeepSpeed dir: its newest tag with a ``complete`` marker unless
--tag). Outputs are written to a temporary directory renamed into place when complete; an existing
output is never overwritten without --force.

    python tools/convert_checkpoint.py --input runs/gpt2/checkpoints --to consolidated --output ckpt/gpt2
    python tools/convert_checkpoint.py --input ckpt/gpt2 --to hf --output hf/gpt2
    python tools/convert_checkpoint.py --input runs/gpt2/checkpoints --tag global_step5000 --to hf --output hf/gpt2
    python tools/convert_checkpoint.py --input hf/llama --to megagpt --output ckpt/llama

Conversions to HF are refused (with every offending field named) when the model has no exact
transformers equivalent, e.g. post-LN with RoPE, LayerNorm with SwiGLU, GQA in a GPT-2 block.
"""
import argparse
import logging
import re

from megagpt.errors import MegaGPTError, cli_main
from megagpt.envsetup import prepare_deepspeed

prepare_deepspeed()   # before deepspeed loads: its per-environment caches


def shard_size(text: str) -> str:
    """--max-shard-size, checked as it is parsed: huggingface_hub would refuse it only after the weights
    were read, with a traceback."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[KMGT]B\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise MegaGPTError("expected a positive size with a unit KB, MB, GB or TB, e.g. 2GB or 500MB",
                           flag=f"--max-shard-size {text}")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="PATH",
                   help="DeepSpeed checkpoint dir, consolidated megagpt dir, or HF transformers dir")
    p.add_argument("--output", required=True, metavar="PATH", help="directory to create")
    p.add_argument("--to", required=True, choices=("consolidated", "hf", "megagpt"),
                   help="consolidated (= megagpt): one unsharded megagpt checkpoint (model.safetensors, "
                        "config.json, tokenizer/) to continue training or finetune; hf: a transformers dir "
                        "that AutoModelForCausalLM/AutoTokenizer.from_pretrained load with no custom code")
    p.add_argument("--tag", help="DeepSpeed input only: checkpoint tag, e.g. global_step1000 "
                                 "(default: the newest tag with a 'complete' marker)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer to bundle (sentencepiece .model or GPT-2 BPE dir) instead of the checkpoint's "
                        "own; needed for checkpoints that only name a tokenizer file which has since moved")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="HF output only: weight dtype (default float32)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="HF output only: largest safetensors shard, e.g. 2GB or 500MB (default: 5GB)")
    p.add_argument("--approximate-gelu", action="store_true",
                   help="HF output only: export a post-LN model with exact GELU (activation: gelu) as OpenAIGPT, "
                        "whose only GELU is the tanh approximation (up to 4.7e-4 off per activation; gpt1/tiny use it)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors (no progress, no DeepSpeed output)")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from megagpt.checkpoint.convert import convert

    out = convert(args.input, args.output, args.to, tag=args.tag, force=args.force, tokenizer=args.tokenizer,
                  dtype=args.dtype, approximate_gelu=args.approximate_gelu, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
