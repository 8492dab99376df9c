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

    python benchmarks/preprocess.py --tokenizer gpt2 [--workers 1]

GPT-2 byte-level BPE (shared/data/tokenizers/gpt2): ours as above; raw: HF ``tokenizers``
``Tokenizer.encode_batch`` of the same in-memory chunks (ids only); old: ``preprocess`` end to end
with the previous encode path (HF ``encode_batch`` per document, ``GPT2BPETokenizer.encode_batch_hf``).
Per-worker figures: this mode sets RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false, so no
encode call uses more than one thread and N workers use N cores.
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


GPT2 = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2"


def _raw_init(model):
    global _SP
    if os.path.isdir(model):  # GPT-2 BPE: HF tokenizers end to end
        from megagpt.tokenizer import load_tokenizer

        _SP = load_tokenizer(model).hf
    else:
        import sentencepiece as spm

        _SP = spm.SentencePieceProcessor(model_file=model)


def _raw_encode(texts):
    if hasattr(_SP, "encode_batch"):
        return sum(len(e.ids) for e in _SP.encode_batch(texts, add_special_tokens=False))
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


def ours(src, out, model, workers, old_path=False):
    """preprocess end to end; ``old_path``: with GPT-2 BPE's previous encode (HF per document)."""
    from megagpt.data.preprocess import preprocess
    from megagpt.tokenizer import GPT2BPETokenizer, Tokenizer

    fast = GPT2BPETokenizer.encode_batch, GPT2BPETokenizer.encode_flat
    if old_path:  # forked workers inherit the class attributes
        GPT2BPETokenizer.encode_batch = GPT2BPETokenizer.encode_batch_hf
        GPT2BPETokenizer.encode_flat = Tokenizer.encode_flat
    try:
        c0, t0 = cpu_seconds(), time.perf_counter()
        s = preprocess([src], out, model, workers=workers, progress=False)
        return s.tokens, time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        GPT2BPETokenizer.encode_batch, GPT2BPETokenizer.encode_flat = fast


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4, help="copies of tinyshakespeare in the corpus")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece model trained for the run")
    p.add_argument("--tokenizer", choices=["sentencepiece", "gpt2"], default="sentencepiece",
                   help="gpt2: GPT-2 BPE from shared/data/tokenizers/gpt2, and the old encode path as a third column")
    a = p.parse_args()
    gpt2 = a.tokenizer == "gpt2"
    if gpt2:  # before tokenizers is imported: one thread per encode call, so figures are per worker
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megagpt.data.preprocess import CHUNK_BYTES, CHUNK_ITEMS, _split_items, read_chunks
    from megagpt.tokenizer import train_sentencepiece

    tmp = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    model = str(GPT2) if gpt2 else train_sentencepiece([str(SHAKESPEARE)], str(tmp / "tok"), vocab_size=a.vocab_size)
    paras = [x for x in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if x.strip()] * a.repeat
    src = tmp / "corpus.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for x in paras:
            f.write(json.dumps({"text": x}) + "\n")
    # the baseline sees exactly the chunks preprocess makes, as decoded strings
    chunks = [[json.loads(line)["text"] for _, line in _split_items(c)]
              for c in read_chunks([str(src)], chunk_bytes=CHUNK_BYTES, chunk_items=CHUNK_ITEMS)]
    mb = src.stat().st_size / 1e6
    print(f"corpus: {len(paras)} docs, {mb:.1f} MB jsonl, tokenizer {'gpt2 BPE' if gpt2 else f'sp vocab {a.vocab_size}'}, "
          f"{len(chunks)} chunks; {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")

    kinds = ("ours", "raw", "old") if gpt2 else ("ours", "raw")
    runs = {(w, k): [] for w in a.workers for k in kinds}  # (wall, CPU) seconds per rep
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
            if gpt2:
                n3, t3, c3 = ours(str(src), str(tmp / f"old{w}"), model, w, old_path=True)
                assert n3 == n1
                for ext in (".bin", ".idx"):
                    assert (tmp / f"old{w}_text_document{ext}").read_bytes() == \
                        (tmp / f"out{w}_text_document{ext}").read_bytes(), "old and new path differ"
                if rep:
                    runs[(w, "old")].append((t3, c3))
    med = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    cmed = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    print()
    raw_name = "raw HF encode_batch" if gpt2 else "raw sp.encode"
    head = ["workers", "preprocess tok/s (MB/s)", f"{raw_name} tok/s", "ratio (wall)", "preprocess CPU s",
            "raw CPU s", "ratio (CPU)"]
    if gpt2:
        head += ["old preprocess tok/s", "old CPU s", "new/old (wall)", "new/old (CPU)", "preprocess tok per CPU s"]

    def row(w):
        r = [str(w), f"{tokens[w] / med[(w, 'ours')]:,.0f} ({mb / med[(w, 'ours')]:.2f})",
             f"{tokens[w] / med[(w, 'raw')]:,.0f}", f"{med[(w, 'raw')] / med[(w, 'ours')]:.1%}",
             f"{cmed[(w, 'ours')]:.2f}", f"{cmed[(w, 'raw')]:.2f}", f"{cmed[(w, 'raw')] / cmed[(w, 'ours')]:.1%}"]
        if gpt2:
            r += [f"{tokens[w] / med[(w, 'old')]:,.0f}", f"{cmed[(w, 'old')]:.2f}",
                  f"x{med[(w, 'old')] / med[(w, 'ours')]:.2f}", f"x{cmed[(w, 'old')] / cmed[(w, 'ours')]:.2f}",
                  f"{tokens[w] / cmed[(w, 'ours')]:,.0f}"]
        return r

    print_table(head, [row(w) for w in a.workers])
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
