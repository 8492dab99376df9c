"""Blend index build time: megagpt's C kernel vs the old pure-Python loop vs megatron-core's C++
``build_blending_indices``, for one weight vector and sample count (default 3 datasets x 100M).

The Python loop is timed on a smaller n (``--python-samples``) and extrapolated linearly (the loop
does the same work per sample); the table says so. Every timed call allocates its output arrays,
megatron's included. Also reports the one-time compile of the kernel (into a fresh cache dir).

    python benchmarks/blend_index.py --samples 100000000 --weights 0.5,0.3,0.2
"""
import argparse
import glob
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import bench, print_table  # noqa: E402
from megagpt.data import blend  # noqa: E402


def megatron_build():
    spec = importlib.util.find_spec("megatron")
    if spec is None:
        return None
    so = glob.glob(os.path.join(spec.submodule_search_locations[0], "core", "datasets", "helpers_cpp*.so"))
    if not so:
        return None
    mspec = importlib.util.spec_from_file_location("helpers_cpp", so[0])
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.build_blending_indices


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100_000_000)
    p.add_argument("--python-samples", type=int, default=1_000_000, help="n for the Python loop (extrapolated)")
    p.add_argument("--weights", default="0.5,0.3,0.2")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    w = np.asarray(blend.normalise_weights([float(x) for x in a.weights.split(",")]))
    n = a.samples

    saved = os.environ.get("MEGAGPT_CACHE")
    with tempfile.TemporaryDirectory() as cache:  # one-time compile, measured in a fresh cache
        os.environ["MEGAGPT_CACHE"] = cache
        blend._kernel = None
        t0 = time.perf_counter()
        blend._load_kernel()
        compile_s = time.perf_counter() - t0
    if saved is None:
        del os.environ["MEGAGPT_CACHE"]
    else:
        os.environ["MEGAGPT_CACHE"] = saved
    blend._kernel = None  # the timed runs load the kernel from the usual cache

    fns = {"megagpt C kernel": lambda: blend.blending_indices(w, n)}
    build = megatron_build()
    if build is not None:
        def megatron():
            idx, sample = np.empty(n, dtype=np.int16), np.empty(n, dtype=np.int64)
            build(idx, sample, w, len(w), n, False)
        fns["megatron-core C++ helper"] = megatron
        ours, ref = fns["megagpt C kernel"](), (np.empty(n, np.int16), np.empty(n, np.int64))
        build(ref[0], ref[1], w, len(w), n, False)
        same = np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])
        del ours, ref
    times = bench(fns, reps=a.repeats, warmup=1)
    t0 = time.perf_counter()
    blend.blending_indices_python(w, a.python_samples)
    times["old pure-Python loop (extrapolated)"] = (time.perf_counter() - t0) * n / a.python_samples

    base = times["megagpt C kernel"]
    rows = [[k, f"{v:.2f}", f"{v / base:.2f}x"] for k, v in times.items()]
    print_table(["implementation", f"seconds for {len(w)} datasets x {n:,} samples", "time / megagpt's"], rows,
                title=f"Blend index, weights {a.weights}")
    print(f"\nmedian of {a.repeats} interleaved runs after 1 warm-up; Python loop: one run of "
          f"{a.python_samples:,} samples x {n // a.python_samples}; one-time kernel compile: {compile_s:.2f} s")
    if build is not None:
        print(f"megagpt output identical to megatron-core's: {same}")


if __name__ == "__main__":
    main()
