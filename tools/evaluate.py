"""Evaluate a megagpt checkpoint on lm-evaluation-harness tasks, offline (docs/evaluation.md).

CHECKPOINT is anything ``megagpt.checkpoint.load_model`` reads: a pretraining --save dir (any
ZeRO stage and TP/PP layout; its newest complete tag unless --tag), a consolidated checkpoint or an
HF transformers dir. The tasks are the YAMLs of megagpt/eval/tasks, reading files under --data-dir
(default $MEGAGPT_EVAL_DATA, else ../shared/data beside the checkout); nothing is downloaded.
Prints lm-eval's table; --output writes the results as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402
from megagpt.envsetup import prepare_deepspeed  # noqa: E402

prepare_deepspeed()


@cli_main
def main(argv=None) -> int:
    from megagpt.atomic import check_output_file
    from megagpt.eval import check_tasks, task_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining --save dir, consolidated checkpoint or HF transformers dir")
    p.add_argument("--tasks", required=True, help=f"comma-separated, of: {', '.join(task_names())}")
    p.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--tag", help="DeepSpeed checkpoints: global_stepN (default: the newest complete tag)")
    p.add_argument("--tokenizer", help="use this tokenizer instead of the checkpoint's own")
    p.add_argument("--data-dir", help="folder holding copa/, storycloze/, glue/ and corpus/")
    p.add_argument("--lambada-text", help="lambada_local's held-back text (a .txt, or a .jsonl written by "
                                          "python -m megagpt.eval.lambada); default: tinyshakespeare's last 10%%")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--output", help="write the results (and per-document samples with --log-samples) as JSON")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    a = p.parse_args(argv)

    tasks = check_tasks(a.tasks)   # before the (slow) model
    if a.limit is not None and a.limit < 1:
        raise MegaGPTError(f"--limit {a.limit}: must be >= 1")
    if a.batch_size < 1:
        raise MegaGPTError(f"--batch-size {a.batch_size}: must be >= 1")
    if a.lambada_text and not os.path.isfile(a.lambada_text):
        raise MegaGPTError(f"--lambada-text {a.lambada_text}: no such file")
    if a.lambada_text and "lambada_local" in tasks:
        from megagpt.eval.lambada import read_lambada

        read_lambada(a.lambada_text)   # read again by the task; a bad file fails here, before the model loads
    if a.output:
        check_output_file(a.output, a.force, "--output")
    from megagpt.eval.tasks.utils import resolve_data_dir

    data_dir = resolve_data_dir(a.data_dir)
    from megagpt.checkpoint.load import detect_format

    detect_format(a.checkpoint)    # a wrong path fails before lm-eval and torch load

    from lm_eval.utils import make_table

    from megagpt.eval import evaluate
    from megagpt.eval.harness import MegaGPTLM

    lm = MegaGPTLM(checkpoint=a.checkpoint, tag=a.tag, tokenizer=a.tokenizer, batch_size=a.batch_size,
                   device=a.device)
    results = evaluate(lm, tasks, limit=a.limit, data_dir=data_dir, lambada_text=a.lambada_text,
                       log_samples=a.log_samples)
    print(make_table(results), flush=True)
    if a.output:
        from megagpt.atomic import write_text_atomic, writing

        keep = {k: results[k] for k in ("results", "versions", "n-samples", "configs", "samples") if k in results}
        keep["checkpoint"] = os.path.abspath(a.checkpoint)
        with writing(a.output):   # a read-only folder: one line; force=False refuses a file made meanwhile
            write_text_atomic(a.output, json.dumps(keep, indent=1, default=str) + "\n", force=a.force)
        print(f"results -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
