"""Sample stream benchmark: random-access samples/s and peak RSS versus corpus size.

1. Throughput (seq_length 1024, warm page cache): ``GPTDataset[i]`` for random i against a
   baseline that slices the same number of tokens straight out of the ``np.memmap`` at the
   same start offset (what any reader must at least pay). Interleaved, 1 warm-up, median of
   ``--repeats``; ratio printed.
2. Memory: synthetic corpora of ``--sizes`` million tokens; for each, a fresh subprocess builds
   the index (first run), and another fresh subprocess loads the cached index and reads
   ``--samples`` random samples. Peak RSS (ru_maxrss) is printed next to that of a subprocess
   that only imports megagpt.data (torch dominates it); the load+read figure should be flat.

    python benchmarks/sample_stream.py [--sizes 10,40,160] [--samples 2000] [--workdir DIR]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from _bench import bench, print_table

SEQ = 1024


def write_corpus(prefix, n_tokens, seed=0):
    """Documents of 50..2000 tokens (mean ~1000), ids < 32000, uint16."""
    from megagpt.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    written = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        while written < n_tokens:
            lengths = rng.integers(50, 2000, 1000)
            toks = rng.integers(0, 32000, int(lengths.sum()), dtype=np.uint16)
            for piece in np.split(toks, np.cumsum(lengths)[:-1]):
                w.add_document(piece)
            written += int(lengths.sum())
    return written


def child(args):
    """Runs in a fresh interpreter: build or load the index, read random samples, report."""
    from megagpt.data import DataConfig, build_gpt_datasets

    out = {}
    if args.prefix:
        cfg = DataConfig([args.prefix], split="1,0,0", seq_length=SEQ, seed=1)
        t0 = time.perf_counter()
        ds, _, _ = build_gpt_datasets(cfg, (args.tokens // SEQ - 1, 0, 0), vocab_size=32000)
        out["index_s"], out["built"] = time.perf_counter() - t0, ds.built_index
        idx = np.random.default_rng(0).integers(0, len(ds), args.samples)
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        out["read_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:  # anonymous (private) vs file-backed (page cache) pages
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    print(json.dumps(out))


def run_child(prefix=None, tokens=0, samples=0):
    cmd = [sys.executable, __file__, "--child", "--samples", str(samples)]
    if prefix:
        cmd += ["--prefix", prefix, "--tokens", str(tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def throughput(prefix, n_tokens, samples, repeats):
    from megagpt.data import DataConfig, build_gpt_datasets

    cfg = DataConfig([prefix], split="1,0,0", seq_length=SEQ, seed=1)
    ds, _, _ = build_gpt_datasets(cfg, (n_tokens // SEQ - 1, 0, 0), vocab_size=32000)
    idx = np.random.default_rng(1).integers(0, len(ds), samples)
    toks = ds.shard.tokens
    starts = []  # flat offset where each chosen sample begins, for the memmap baseline
    for i in idx:
        p, off = ds.sample_idx[ds.shuffle_idx[i]]
        doc = int(ds.doc_idx[p])
        starts.append(min(int(ds.shard.pointers[ds.shard.doc_idx[doc]]) // 2 + int(off), len(toks) - SEQ - 1))

    def run_ds():
        for i in idx:
            ds[int(i)]["tokens"]

    def run_raw():
        for s in starts:
            np.asarray(toks[s:s + SEQ + 1], dtype=np.int64)

    times = bench({"GPTDataset[i]": run_ds, "np.memmap slice": run_raw}, repeats, warmup=1)
    return {k: samples / t for k, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,40,160", help="corpus sizes, millions of tokens")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--prefix")
    ap.add_argument("--tokens", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = args.workdir or tempfile.mkdtemp(prefix="megagpt-bench-")
    base = run_child()
    print(f"workdir {work}; {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f}\n")
    rows = []
    for m in (int(x) for x in args.sizes.split(",")):
        prefix = os.path.join(work, f"corpus_{m}M")
        n_tok = write_corpus(prefix, m * 1_000_000)
        build = run_child(prefix, n_tok, 0)
        load = run_child(prefix, n_tok, args.samples)
        assert build["built"] and not load["built"]
        rows.append((m, n_tok, build, load))
    print("RSS in MB; 'anon' = private memory at exit, 'file' = mapped page-cache pages at exit "
          f"(shared, reclaimable); import-only subprocess: peak {base['peak_rss_mb']:.0f}, "
          f"anon {base['RssAnon']:.0f}, file {base['RssFile']:.0f}")
    print_table(["corpus tokens", "build index s", "build: peak / anon / file", "load index s",
                 f"load + {args.samples} reads: peak / anon / file", "reads/s (cold process)"],
                [(f"{n_tok / 1e6:.1f}M", f"{b['index_s']:.2f}",
                  f"{b['peak_rss_mb']:.0f} / {b['RssAnon']:.0f} / {b['RssFile']:.0f}", f"{l['index_s']:.3f}",
                  f"{l['peak_rss_mb']:.0f} / {l['RssAnon']:.0f} / {l['RssFile']:.0f}",
                  f"{args.samples / l['read_s']:,.0f}") for m, n_tok, b, l in rows])

    rates = throughput(prefix, n_tok, args.samples, args.repeats)   # the last (largest) corpus
    print(f"\nload average after the runs {os.getloadavg()[0]:.1f}")
    print(f"\nrandom access, seq {SEQ}, {n_tok / 1e6:.0f}M-token corpus, {args.samples} samples, "
          f"median of {args.repeats} (warm page cache)")
    raw = rates["np.memmap slice"]
    print_table(["reader", "samples/s", "ratio vs memmap"],
                [(k, f"{v:,.0f}", f"{v / raw:.2f}") for k, v in rates.items()])


if __name__ == "__main__":
    main()
