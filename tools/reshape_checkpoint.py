#!/usr/bin/env python
"""Consolidate a DeepSpeed checkpoint written at any TP/PP/DP layout into the consolidated format.

    python tools/reshape_checkpoint.py CKPT_DIR OUT_DIR [--tag global_step1000]
        [--model-config model.json | --preset tiny] [--tokenizer PATH] [--force]

The result (serial GPT parameter names) loads into any layout:
``megagpt.checkpoint.reshape.load_consolidated_into(model, OUT_DIR)``. Weights only: optimizer
state is not carried over (a resumed optimizer starts fresh). See docs/parallelism.md.
"""
import argparse
import json
import sys
from pathlib import Path

from megagpt.errors import MegaGPTError, cli_main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="DeepSpeed checkpoint directory (holding 'latest' and tag subdirectories)")
    p.add_argument("out_dir", help="consolidated checkpoint directory to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in CKPT_DIR/latest)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model-config", default=None,
                   help="JSON file with the ModelConfig dict (default: from the checkpoint's client state)")
    g.add_argument("--preset", default=None, help="model preset name instead of --model-config")
    p.add_argument("--tokenizer", default=None, help="tokenizer to bundle (.model file or GPT-2 BPE dir)")
    p.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it exists")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megagpt.checkpoint.reshape import consolidate_deepspeed_checkpoint, save_consolidated_checkpoint

    model_cfg = None
    if args.model_config:
        path = Path(args.model_config)
        try:
            model_cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MegaGPTError(f"{path}: cannot read model config JSON ({e})") from None
        model_cfg = model_cfg.get("model", model_cfg)   # a consolidated config.json works too
    elif args.preset:
        from megagpt.model import get_preset

        model_cfg = get_preset(args.preset)
    full_sd, cfg = consolidate_deepspeed_checkpoint(args.ckpt_dir, tag=args.tag, model_cfg=model_cfg)
    out = save_consolidated_checkpoint(args.out_dir, full_sd, cfg, tokenizer_path=args.tokenizer, force=args.force)
    print(f"wrote {out} ({len(full_sd)} tensors, {cfg.n_layer} layers)")


if __name__ == "__main__":
    main()
