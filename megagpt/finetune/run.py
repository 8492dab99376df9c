"""Finetune a GPT on a GPT-1 task. Runs as a plain process or under the deepspeed launcher:

    python megagpt/finetune/run.py --task sst2 --init CKPT_DIR --save-dir runs/sst2
    deepspeed --num_gpus 2 megagpt/finetune/run.py --task rte --init random \\
        --tokenizer tok.model --preset tiny --train-limit 64 --epochs 1

Tasks: sst2 (classification), rte (entailment), mrpc / stsb (similarity; stsb is regression),
copa / storycloze (multiple choice; their single file is split first 80% train / last 20% eval).
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):   # `python megagpt/finetune/run.py` / deepspeed launcher: script path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402
from megagpt.finetune.loop import FinetuneConfig, finetune  # noqa: E402
from megagpt.finetune.tasks import TASKS  # noqa: E402

D = FinetuneConfig()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="GLUE/COPA/Story Cloze task to finetune on")
    p.add_argument("--data-root", default=D.data_root, help="folder holding glue/, copa/, storycloze/")
    p.add_argument("--init", default=D.init,
                   help="'random', a consolidated megagpt checkpoint dir, or a DeepSpeed pretraining checkpoint dir")
    p.add_argument("--preset", default=D.preset, help="model preset for --init random")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=JSON",
                   help="ModelConfig override for --init random, e.g. n_layer=4 (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint's)")
    p.add_argument("--max-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--lr", type=float, default=D.lr, help=f"peak learning rate (GPT-1: {D.lr})")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="global batch, in examples")
    p.add_argument("--epochs", type=int, default=D.epochs, help=f"passes over the training set (default {D.epochs})")
    p.add_argument("--warmup-frac", type=float, default=D.warmup_frac, help=f"linear warmup as a fraction of all steps, then linear decay (default {D.warmup_frac})")
    p.add_argument("--lm-coef", type=float, default=D.lm_coef, help="λ of the auxiliary LM loss; 0 disables it")
    p.add_argument("--clf-dropout", type=float, default=D.clf_dropout, help=f"dropout before the task head (default {D.clf_dropout})")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay on matrices")
    p.add_argument("--zero-stage", type=int, default=D.zero_stage, help="DeepSpeed ZeRO stage 0-2 (3 is refused: best-checkpoint save needs full weights)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON to merge (batch/zero/optimizer keys are ours)")
    p.add_argument("--seed", type=int, default=D.seed, help="seed for init, head, dropout and shuffling")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--eval-limit", type=int, default=None, help="use the first N eval examples")
    p.add_argument("--train-fraction", type=float, default=D.train_fraction,
                   help="copa/storycloze: this leading fraction of the file is train, the rest eval")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of failing")
    p.add_argument("--save-dir", default=None, help="writes best/ (best eval by the task's main metric) and history.json")
    p.add_argument("--log-every", type=int, default=D.log_every, help="print the training loss every N steps")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def config_from_args(a) -> FinetuneConfig:
    overrides = {}
    for item in a.model_override:
        key, sep, val = item.partition("=")
        if not sep:
            raise MegaGPTError(f"--model-override {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(val)
        except json.JSONDecodeError:
            overrides[key] = val
    return FinetuneConfig(
        task=a.task, data_root=a.data_root, init=a.init, preset=a.preset, tokenizer=a.tokenizer,
        max_len=a.max_len, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, warmup_frac=a.warmup_frac,
        lm_coef=a.lm_coef, clf_dropout=a.clf_dropout, weight_decay=a.weight_decay, zero_stage=a.zero_stage,
        ds_config=a.ds_config, seed=a.seed, train_limit=a.train_limit, eval_limit=a.eval_limit,
        train_fraction=a.train_fraction, skip_bad=a.skip_bad, save_dir=a.save_dir, log_every=a.log_every,
        model_overrides=overrides)


@cli_main
def main(argv=None):
    finetune(config_from_args(parse_args(argv)))


if __name__ == "__main__":
    main()
