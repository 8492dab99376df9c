#!/usr/bin/env python
"""Peak memory of one training step with the LM loss all at once vs ``train.loss_chunk_tokens``.

    python benchmarks/loss_memory.py [--vocab 50257] [--seq 1024] [--batch 2] [--chunks 0 1024 256]

Each variant runs in a fresh process (a 2-layer width-256 GPT, forward + backward of one batch)
and reports its peak memory and time (one cold step: indicative only): CUDA's max allocated on a GPU, else the process's peak RSS minus
the RSS just before the step (model, batch and imports excluded). The loss of every variant is
printed beside the baseline's (chunk 0 = the whole batch's full-vocabulary fp32 logits at once).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from _bench import print_table

REPO = Path(__file__).resolve().parents[1]

STEP = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
from megagpt.model import GPT, get_preset
cfg = get_preset("tiny-gpt2", n_layer=2, n_embd=256, n_head=4, max_seq_len={seq}, vocab_size={vocab})
torch.manual_seed(0)
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
m = GPT(cfg).to(dev)
m.loss_chunk_tokens = {chunk}
x = torch.randint(0, {vocab}, ({batch}, {seq}), device=dev)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # MiB (Linux: KiB)
import time
before = torch.cuda.memory_allocated() / 2**20 if cuda else rss()
t0 = time.perf_counter()
loss = m(x, labels=torch.roll(x, -1, 1))
loss.backward()
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss()
print(json.dumps({{"loss": loss.item(), "step_mib": peak - before, "seconds": seconds}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    a = p.parse_args()
    runs = {}
    for chunk in a.chunks:
        code = STEP.format(repo=str(REPO), seq=a.seq, vocab=a.vocab, batch=a.batch, chunk=chunk)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
    base = runs[a.chunks[0]]
    rows = [[str(c) if c else "all at once", f"{r['step_mib']:.0f}", f"{r['step_mib'] / base['step_mib']:.2f}",
             f"{r['seconds']:.2f}", f"{r['loss']:.7f}", f"{abs(r['loss'] - base['loss']):.1e}"]
            for c, r in runs.items()]
    print_table(["loss_chunk_tokens", "step peak MiB", "ratio", "step s (one, cold)", "loss", "abs Δloss"], rows,
                f"one step, vocab {a.vocab}, seq {a.seq}, batch {a.batch}")


if __name__ == "__main__":
    main()
