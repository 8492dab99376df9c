"""Check ``--model megagpt`` against lm-eval's own ``hf`` backend on the same weights.

``python -m megagpt.eval.parity CHECKPOINT --tasks copa_local,lambada_local --limit 100`` exports the
checkpoint to HF (``megagpt.checkpoint.convert``, in a temporary dir), runs the tasks with both
backends and prints, per task, the worst per-request log-likelihood difference, whether every greedy
flag agrees, and both accuracies. ``--random-preset tiny-modern`` uses a random model of that preset
(vocab of the legacy test tokenizer, noise on every tensor) instead: the numbers in docs/evaluation.md.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from megagpt.errors import MegaGPTError, cli_main

REPO = Path(__file__).resolve().parents[2]


def random_checkpoint(preset: str, out: Path, tokenizer: str, seed: int = 0) -> Path:
    """A consolidated random model: noise on every tensor; byte pieces (ids 6..261 of a megagpt
    sentencepiece model) never the argmax, so greedy text is valid UTF-8 in both tokenizers."""
    import torch

    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model = GPT(get_preset(preset, vocab_size=load_tokenizer(tokenizer).vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.weight[6:262] = 0
    return save_consolidated(out, model.state_dict(), model.cfg.to_dict(), tokenizer_path=tokenizer)


def per_request(results: dict) -> dict:
    """{(task, doc_id, request index): (log-likelihood, is_greedy)} from ``log_samples`` results."""
    return {(task, s["doc_id"], i): tuple(r[0]) for task, samples in results["samples"].items()
            for s in samples for i, r in enumerate(s["resps"])}


def compare(checkpoint, tasks, limit=None, data_dir=None, batch_size=16) -> dict:
    """{task: {"requests", "worst_abs_diff", "greedy_equal", "ours", "hf"}} (and ``seconds``)."""
    from lm_eval.models.huggingface import HFLM

    from megagpt.checkpoint.convert import convert

    from . import evaluate, scores
    from .harness import MegaGPTLM

    with tempfile.TemporaryDirectory(prefix="megagpt-parity-") as tmp:
        hf_dir = convert(checkpoint, Path(tmp) / "hf", "hf")
        ours = MegaGPTLM(checkpoint=str(checkpoint), batch_size=batch_size)
        theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch_size, dtype="float32",
                      prefix_token_id=ours.prefix_token_id)
        t0 = time.perf_counter()
        a = evaluate(ours, tasks, limit=limit, data_dir=data_dir, log_samples=True)
        t1 = time.perf_counter()
        b = evaluate(theirs, tasks, limit=limit, data_dir=data_dir, log_samples=True)
        t2 = time.perf_counter()
    ra, rb, sa, sb = per_request(a), per_request(b), scores(a), scores(b)
    if ra.keys() != rb.keys():
        raise MegaGPTError("the two backends were given different requests")
    out = {}
    for task in sa:
        keys = [k for k in ra if k[0] == task]
        out[task] = {"requests": len(keys), "worst_abs_diff": max(abs(ra[k][0] - rb[k][0]) for k in keys),
                     "greedy_equal": all(ra[k][1] == rb[k][1] for k in keys), "ours": sa[task], "hf": sb[task]}
    out["seconds"] = {"ours": t1 - t0, "hf": t2 - t1}
    return out


@cli_main
def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="any checkpoint load_model reads (or --random-preset)")
    ap.add_argument("--random-preset", help="a random model of this preset instead of a checkpoint")
    ap.add_argument("--tokenizer", default=str(REPO / "tests" / "fixtures" / "legacy_v0" / "tokenizer.model"),
                    help="the random model's tokenizer (default: the legacy test fixture's, vocab 400)")
    ap.add_argument("--tasks", default="copa_local,storycloze_local,sst2_local,rte_local,mrpc_local,lambada_local")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--data-dir")
    a = ap.parse_args(argv)
    from . import check_tasks

    tasks = check_tasks(a.tasks)
    if bool(a.checkpoint) == bool(a.random_preset):
        raise MegaGPTError("give a CHECKPOINT or --random-preset PRESET (one of them)")
    with tempfile.TemporaryDirectory(prefix="megagpt-parity-model-") as tmp:
        ckpt = a.checkpoint or random_checkpoint(a.random_preset, Path(tmp) / "cons", a.tokenizer)
        res = compare(ckpt, tasks, a.limit, a.data_dir)
    for task, row in res.items():
        if task != "seconds":
            print(f"{task}: {row['requests']} requests, worst |dll| {row['worst_abs_diff']:.2e}, greedy flags "
                  f"equal {row['greedy_equal']}, ours {row['ours']}, hf {row['hf']}")
    print(f"seconds: ours {res['seconds']['ours']:.1f}, hf {res['seconds']['hf']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
