"""Finetune a GPT on a GPT-1 task. Runs as a plain process or under the deepspeed launcher:

    python megagpt/finetune/run.py --task sst2 --init CKPT_DIR --save runs/sst2
    deepspeed --num_gpus 2 megagpt/finetune/run.py --task rte --init random \\
        --tokenizer tok.model --preset tiny --train-limit 64 --epochs 1

Tasks: sst2 (classification), rte (entailment), mrpc / stsb (similarity; stsb is regression),
copa / storycloze (multiple choice; their single file is split first 80% train / last 20% eval).

Every flag is a field of megagpt.config.FinetuneConfig, named as in pretraining where shared; the
``finetune:`` section of a YAML/JSON file (--config) can hold the same settings, flags override it.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):   # `python megagpt/finetune/run.py` / deepspeed launcher: script path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402
from megagpt.envsetup import prepare_deepspeed  # noqa: E402

prepare_deepspeed()   # before deepspeed loads: its per-environment caches


def build_parser():
    from megagpt.config import FinetuneConfig
    from megagpt.schema import FlagSet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML/JSON with a finetune: section (optional)")
    p.add_argument("--model-override", action="append", default=None, metavar="KEY=JSON",
                   help="ModelConfig override for --init random, e.g. n_layer=4 (repeatable) "
                        "[finetune.model_overrides, default {}]")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher
    flags = FlagSet(p)
    flags.add("finetune", FinetuneConfig)
    return p, flags


def parse_args(argv=None):
    """(args, overrides {("finetune", key): value} of the flags given)."""
    a, overrides = build_parser()[1].parse(argv)
    if a.model_override is not None:
        models = {}
        for item in a.model_override:
            key, sep, val = item.partition("=")
            if not sep:
                raise MegaGPTError(f"expected KEY=VALUE, got {item!r}", flag=f"--model-override {item}")
            try:
                models[key] = json.loads(val)
            except json.JSONDecodeError:
                models[key] = val
        overrides[("finetune", "model_overrides")] = models
        overrides.flags[("finetune", "model_overrides")] = " ".join(f"--model-override {i}" for i in a.model_override)
    return a, overrides


@cli_main
def main(argv=None):
    from megagpt.config import load_finetune_config
    from megagpt.finetune.loop import finetune

    a, overrides = parse_args(argv)
    finetune(load_finetune_config(a.config, overrides))


if __name__ == "__main__":
    main()
