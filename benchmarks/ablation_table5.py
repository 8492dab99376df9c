"""A CPU miniature of GPT-1's Table 5 ablation: does pretraining help, does the auxiliary LM loss?

1. Train a sentencepiece BPE tokenizer on tinyshakespeare and preprocess the corpus into shards.
2. Pretrain a small GPT-1-style (post-LN) model on it with a plain torch loop over megagpt's
   sample stream (``build_gpt_datasets``), save it as a consolidated checkpoint.
3. Finetune with ``megagpt.finetune.loop.finetune`` (DeepSpeed engine, one process) on SST-2 and
   RTE, from {pretrained, random init} x {λ = 0.5, λ = 0}, for several seeds, and print a table of
   final-epoch dev accuracy (mean ± half-range over seeds).

    OMP_NUM_THREADS=1 python benchmarks/ablation_table5.py --out /tmp/ablation [--quick]

Results are appended to ``<out>/results.json`` after every run, so an interrupted run keeps what
it finished. ``--quick`` shrinks everything to check that the script works (~2 min).
"""
import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _bench import print_table  # noqa: E402
from megagpt.atomic import write_text_atomic  # noqa: E402
from megagpt.errors import cli_main  # noqa: E402

DATA = REPO.parent / "shared" / "data"
MODEL = dict(n_layer=4, n_embd=128, n_head=4, max_seq_len=64, ffn_hidden=512,
             embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1)


def pretrain(out: Path, args, log):
    """Tokenizer + shards + a plain-torch pretraining loop; returns the consolidated checkpoint dir."""
    from megagpt.data.config import DataConfig
    from megagpt.data.gpt_dataset import build_gpt_datasets
    from megagpt.data.preprocess import preprocess
    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer, train_sentencepiece
    from megagpt.train.loop import to_batch
    from megagpt.train.optim import param_groups
    from megagpt.train.schedule import Schedule, build_scheduler

    corpus = str(DATA / "corpus" / "tinyshakespeare.txt")
    tok_path = train_sentencepiece([corpus], str(out / "tok"), vocab_size=args.vocab, num_threads=1)
    tok = load_tokenizer(tok_path)
    preprocess([corpus], str(out / "shakespeare"), tok_path, split_paragraphs=True, workers=1)
    prefix = str(out / "shakespeare_text_document")
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, **MODEL)
    seq = cfg.max_seq_len
    dc = DataConfig(data_path=[prefix], split="98,2,0", seq_length=seq, seed=1234)
    n_valid = 64
    train, valid, _ = build_gpt_datasets(dc, (args.pretrain_steps * args.pretrain_batch, n_valid, 0), tok.vocab_size)

    torch.manual_seed(1234)
    model = GPT(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=args.pretrain_lr, betas=(0.9, 0.95))
    sched = build_scheduler(opt, Schedule(args.pretrain_lr, 0.0, max(1, args.pretrain_steps // 20),
                                          args.pretrain_steps, "cosine"))

    @torch.no_grad()
    def val_loss():
        model.eval()
        x, y = to_batch(valid, range(n_valid), "cpu")
        loss = model(x, labels=y).item()
        model.train()
        return loss

    t0 = time.time()
    log(f"pretrain: {model.num_params():,} params, {len(train)} windows of {seq} tokens, "
        f"{args.pretrain_steps} steps x {args.pretrain_batch}; initial val loss {val_loss():.3f}")
    model.train()
    for step in range(args.pretrain_steps):
        b = args.pretrain_batch
        x, y = to_batch(train, range(step * b, (step + 1) * b), "cpu")
        loss = model(x, labels=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.pretrain_steps // 10) == 0:
            log(f"pretrain step {step + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    vl = val_loss()
    log(f"pretrain done in {time.time() - t0:.0f}s: val loss {vl:.3f} (ppl {math.exp(vl):.1f})")
    ckpt = save_consolidated(out / "pretrained", model.state_dict(), cfg.to_dict(), tokenizer_path=tok_path,
                             step=args.pretrain_steps, force=True)
    return ckpt, tok_path, {"val_loss": vl, "seconds": time.time() - t0, "params": model.num_params()}


def table(results, tasks):
    rows = []
    for init, lm in itertools.product(("pretrained", "random"), (0.5, 0.0)):
        cells = []
        for t in tasks:
            accs = [r["accuracy"] for r in results if (r["task"], r["init"], r["lm_coef"]) == (t, init, lm)]
            if not accs:
                cells.append("–")
                continue
            half = (max(accs) - min(accs)) / 2
            cells.append(f"{100 * statistics.mean(accs):.1f} ± {100 * half:.1f} (n={len(accs)})")
        rows.append((init, str(lm), *cells))
    print_table(["init", "aux LM (λ)", *(f"{t.upper()} dev acc" for t in tasks)], rows)


@cli_main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/megagpt_ablation")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lr", type=float, default=5e-4, help="finetune lr (GPT-1: 6.25e-5 for a 117M model)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, nargs="+", default=[1600, 800], help="per task, in --tasks order")
    p.add_argument("--eval-limit", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        args.pretrain_steps, args.epochs, args.train_limit, args.eval_limit = 20, 1, [64], 64
    limits = dict(zip(args.tasks, args.train_limit * len(args.tasks)))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    from megagpt.config import FinetuneConfig
    from megagpt.finetune.loop import finetune

    t_start = time.time()
    ckpt, tok_path, pre = pretrain(out, args, log)
    results = []
    arms = itertools.product(args.seeds, args.tasks, ("pretrained", "random"), (0.5, 0.0))
    for seed, task, init, lm_coef in arms:  # seed-major: an interrupted run stays balanced
        t0 = time.time()
        cfg = FinetuneConfig(task=task, data_root=str(DATA), init=str(ckpt) if init == "pretrained" else "random",
                             preset="tiny", model_overrides=dict(MODEL), tokenizer=tok_path, lr=args.lr,
                             batch_size=32, epochs=args.epochs, lm_coef=lm_coef, seed=seed,
                             train_limit=limits[task], eval_limit=args.eval_limit, log_interval=0)
        res = finetune(cfg, log=lambda m: None)
        last = res["history"][-1]
        row = {"task": task, "init": init, "lm_coef": lm_coef, "seed": seed, "accuracy": last["accuracy"],
               "best_epoch_accuracy": res["best"]["accuracy"], "train_loss": last["train_loss"],
               "seconds": round(time.time() - t0, 1)}
        results.append(row)
        log(json.dumps(row))
        state = {"pretrain": pre, "args": vars(args), "results": results}
        write_text_atomic(out / "results.json", json.dumps(state, indent=2))  # an interrupted run keeps it
    log(f"total {time.time() - t_start:.0f}s")
    print(f"\npretrain: {pre['params']:,} params, {args.pretrain_steps} steps, val loss {pre['val_loss']:.3f}, "
          f"{pre['seconds']:.0f}s")
    table(results, args.tasks)
    # majority-class baseline on the same dev sets, for reading the table
    from megagpt.finetune.tasks import get_task
    for t in args.tasks:
        ev = get_task(t).load(DATA)[1][:args.eval_limit]
        maj = max(sum(e.label == c for e in ev) for c in (0, 1)) / len(ev)
        print(f"{t}: majority-class dev accuracy {100 * maj:.1f} ({len(ev)} examples)")


if __name__ == "__main__":
    main()
