#!/usr/bin/env python
"""Preprocessing throughput vs raw sentencepiece ``encode`` on the same text and cores.

    python benchmarks/preprocess.py [--repeat 4] [--reps 5] [--workers 1 2]

Corpus: tinyshakespeare repeated ``--repeat`` times as jsonl, one document per paragraph.
* ours: ``megagpt.data.preprocess.preprocess`` end to end (read, JSON parse, encode, write
  .bin/.idx), timed from the call to the return (pool start-up included).
* raw: the baseline: the same documents already in memory as str, the same chunking, a Pool of
  the same size whose workers call ``sp.encode(chunk)`` and return only a token count (no
  reading, no parsing, no transfer of tokens, no writing); workers=1 runs in-process.
Runs are interleaved (ours, raw, ours, raw, ...) after one warm-up of each; medians of ``--reps``.
Wall-clock ratios need an idle machine; the CPU-seconds columns (process + workers) compare the
work done and are far less sensitive to other load on the box.
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import print_table

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"

_SP = None


def _raw_init(model):
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model)


def _raw_encode(texts):
    return sum(map(len, _SP.encode(texts, num_threads=1)))


def cpu_seconds():
    """CPU time of this process plus its reaped children (worker pools are joined before we read it)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_encode(model, chunks, workers):
    c0, t0 = cpu_seconds(), time.perf_counter()
    if workers == 1:
        _raw_init(model)
        n = sum(_raw_encode(c) for c in chunks)
    else:
        with mp.get_context("fork").Pool(workers, initializer=_raw_init, initargs=(model,)) as pool:
            n = sum(pool.imap(_raw_encode, chunks))
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def ours(src, out, model, workers):
    from megagpt.data.preprocess import preprocess

    c0, t0 = cpu_seconds(), time.perf_counter()
    s = preprocess([src], out, model, workers=workers, progress=False)
    return s.tokens, time.perf_counter() - t0, cpu_seconds() - c0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4, help="copies of tinyshakespeare in the corpus")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=4000)
    a = p.parse_args()
    from megagpt.data.preprocess import CHUNK_BYTES, CHUNK_ITEMS, _split_items, read_chunks
    from megagpt.tokenizer import train_sentencepiece

    tmp = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    model = train_sentencepiece([str(SHAKESPEARE)], str(tmp / "tok"), vocab_size=a.vocab_size)
    paras = [x for x in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if x.strip()] * a.repeat
    src = tmp / "corpus.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for x in paras:
            f.write(json.dumps({"text": x}) + "\n")
    # the baseline sees exactly the chunks preprocess makes, as decoded strings
    chunks = [[json.loads(line)["text"] for _, line in _split_items(c)]
              for c in read_chunks([str(src)], chunk_bytes=CHUNK_BYTES, chunk_items=CHUNK_ITEMS)]
    mb = src.stat().st_size / 1e6
    print(f"corpus: {len(paras)} docs, {mb:.1f} MB jsonl, vocab {a.vocab_size}, {len(chunks)} chunks; "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")

    runs = {(w, k): [] for w in a.workers for k in ("ours", "raw")}  # (wall, CPU) seconds per rep
    tokens = {}
    for rep in range(a.reps + 1):  # rep 0 is the warm-up
        for w in a.workers:
            n1, t1, c1 = ours(str(src), str(tmp / f"out{w}"), model, w)
            n2, t2, c2 = raw_encode(model, chunks, w)
            assert n1 == n2 + len(paras), (n1, n2)  # ours adds one eod per document
            tokens[w] = n2
            if rep:
                runs[(w, "ours")].append((t1, c1))
                runs[(w, "raw")].append((t2, c2))
    med = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    cmed = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    print()
    print_table(["workers", "preprocess tok/s (MB/s)", "raw sp.encode tok/s", "ratio (wall)", "preprocess CPU s",
                 "raw CPU s", "ratio (CPU)"],
                [(str(w), f"{tokens[w] / med[(w, 'ours')]:,.0f} ({mb / med[(w, 'ours')]:.2f})",
                  f"{tokens[w] / med[(w, 'raw')]:,.0f}", f"{med[(w, 'raw')] / med[(w, 'ours')]:.1%}",
                  f"{cmed[(w, 'ours')]:.2f}", f"{cmed[(w, 'raw')]:.2f}", f"{cmed[(w, 'raw')] / cmed[(w, 'ours')]:.1%}")
                 for w in a.workers])
    if len(a.workers) > 1:
        w0, w1 = a.workers[0], a.workers[-1]
        print(f"\nscaling workers {w0} → {w1}: preprocess x{med[(w0, 'ours')] / med[(w1, 'ours')]:.2f}, "
              f"raw encode x{med[(w0, 'raw')] / med[(w1, 'raw')]:.2f}")
    cpu_model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(f"\nmedian of {a.reps} interleaved runs after warm-up; {cpu_model.split(':')[-1].strip()}; "
          f"python {platform.python_version()}; load avg after {os.getloadavg()[0]:.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
