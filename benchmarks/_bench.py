"""What the benchmark scripts share: interleaved median timing and markdown tables."""
import statistics
import time


def _seconds(fn, cuda: bool) -> float:
    if cuda:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(fns: dict, reps: int, cuda: bool = False, warmup: int = 3) -> dict:
    """Median seconds per call of each fn, timed interleaved (A B C A B C ...) after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_seconds(fn, cuda))
    return {k: statistics.median(v) for k, v in times.items()}


def print_table(header, rows, title=None):
    """A markdown table of already formatted cells, under a ``### title`` if given."""
    if title:
        print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
