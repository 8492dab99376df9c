"""Throughput and utilisation accounting, console line, tensorboard scalars, jsonl log. MFU = achieved
model FLOP/s per device / peak FLOP/s per device of the dtype the run computes in, model FLOPs per
token from ``model.flops_per_token`` (PaLM: 6N + 12·L·H·Q·T).

The peak (``peak_flops``): ``train.peak_tflops`` when configured; the datasheet number of a known
GPU; on a CPU, ``torch.mm`` in that dtype timed now (best of 15) and the best such figure this
machine ever measured, cached per CPU model, thread count, dtype and torch version — one busy
moment at start-up cannot lower it. A step that still beats it raises it (and says so): MFU above
100% would be a wrong peak, not a result.
"""
from __future__ import annotations

import json
import os
import platform
import time
import timeit
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from megagpt.atomic import write_bytes_atomic
from megagpt.errors import MegaGPTError, first_line

# dense peaks without sparsity, FLOP/s: bf16/fp16 tensor cores, and fp32 (no TF32)
_GPU_PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "A10G": (125e12, 31.2e12), "L4": (121e12, 30.3e12), "V100": (125e12, 15.7e12)}
PEAK_CACHE = Path(os.environ.get("MEGAGPT_CACHE", Path.home() / ".cache" / "megagpt")) / "peak_flops.json"


def measure_matmul_flops(dtype=torch.float32, n: int = 1024, reps: int = 15) -> float:
    """Best-of-``reps`` ``torch.mm`` FLOP/s on the CPU in ``dtype`` (with this process's thread count)."""
    g = torch.Generator().manual_seed(0)   # private: never advance the (just restored) training RNG
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.mm(a, b)   # warm-up
    return 2 * n**3 / min(timeit.repeat(lambda: torch.mm(a, b), number=1, repeat=reps))


def _cpu_key(dtype) -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{model} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__}"


def remember_peak(dtype, flops: float) -> float:
    """The best of ``flops`` and the cached figure for this CPU and dtype (the cache keeps the best)."""
    key = _cpu_key(dtype)
    try:
        cache = json.loads(PEAK_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if flops > cache.get(key, 0.0):
        cache[key] = flops
        try:
            PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(PEAK_CACHE, json.dumps(cache, indent=1).encode())
        except OSError:
            pass   # a read-only home: the figure is still used, just not remembered
    return max(flops, cache.get(key, 0.0))


def peak_flops(dtype=torch.float32, configured_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device for ``dtype``, where the number comes from)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if configured_tflops:
        return configured_tflops * 1e12, f"{name}, configured train.peak_tflops"
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return remember_peak(dtype, measure_matmul_flops(dtype)), \
            f"{name} torch.mm on this CPU: the best of 15 timings now and of those cached in {PEAK_CACHE}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else acc.device_name()
    for key, (half, fp32) in _GPU_PEAKS.items():
        if key in device:
            return (fp32 if dtype == torch.float32 else half), f"{key} {name} datasheet peak"
    return 989e12, f"unknown device {device!r}: assuming the H100 bf16 peak (set train.peak_tflops)"


def memory_gib() -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU, in GiB."""
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def check_wandb_installed() -> None:
    """``train.wandb_project`` needs the ``wandb`` package: say so before any process group starts."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise MegaGPTError("wandb is not installed (pip install wandb), or remove the key", key="wandb_project") \
            from None


class WandbSink:
    """The tensorboard scalars, mirrored to one Weights & Biases run (rank 0). With a save directory the
    run id is kept in ``<save>/wandb_run_id`` so a resumed training run continues the same W&B run."""

    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict | None):
        import wandb

        self.wandb = wandb
        run_id, id_file = None, os.path.join(save_dir, "wandb_run_id") if save_dir else None
        if id_file and os.path.exists(id_file):
            run_id = Path(id_file).read_text().strip() or None
        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow" if run_id else None,
                                  config=config, dir=os.environ.get("WANDB_DIR") or save_dir or None)
        except Exception as e:   # no login, no network in online mode, ...: one line, not wandb's traceback
            raise MegaGPTError(f"wandb.init failed ({first_line(e)}); log in (wandb login) or set "
                               f"WANDB_MODE=offline", key="train.wandb_project") from None
        if id_file and run_id is None:
            os.makedirs(save_dir, exist_ok=True)
            write_bytes_atomic(Path(id_file), self.run.id.encode())

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        """Finish the run and stop W&B's service process: only then is an offline run file complete."""
        self.run.finish()
        self.wandb.teardown()


class ScalarSinks:
    """``Metrics.writer``: tensorboard's ``add_scalar`` mirrored to W&B, so a scalar any code writes through
    the writer (e.g. megagpt/eval/periodic.py's harness scores) reaches both; anything else a
    SummaryWriter has (flush, histograms) goes to tensorboard alone."""

    def __init__(self, tb=None, wandb: WandbSink | None = None):
        self.tb, self.wandb = tb, wandb

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.add_scalars({tag: value}, step)

    def add_scalars(self, scalars: dict, step: int) -> None:
        """Several tagged scalars at one step (one W&B history row)."""
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in scalars.items()}, step)

    def __getattr__(self, name):
        if self.tb is None:
            raise AttributeError(f"{name}: no tensorboard writer in this run (train.tensorboard_dir / save unset)")
        return getattr(self.tb, name)

    def close(self) -> None:
        for sink in (self.tb, self.wandb):
            if sink is not None:
                sink.close()


class Metrics:
    """Rank-0 sinks: console line (via tqdm.write), tensorboard scalars, optionally the same scalars in
    Weights & Biases, and a jsonl log (every step's loss and lr; at log steps every scalar)."""

    first_step_compiles = False   # train.compile: the next step's time is compile_s, kept out of throughput

    def __init__(self, rank: int, tb_dir: str | None, jsonl_path: str | None, flops_per_token: int,
                 tokens_per_step: int, world: int, peak: float, peak_src: str, total_steps: int, start_step: int,
                 progress_bar: bool, wandb: dict | None = None):
        """``wandb``: None, or WandbSink's keyword arguments (project, name, save_dir, config)."""
        self.rank, self.world = rank, world
        self.flops_per_token, self.tokens_per_step = flops_per_token, tokens_per_step
        self.peak, self.total = peak, total_steps
        self.writer = self.bar = self.jsonl = None
        self.reset_timer()
        if rank != 0:
            return
        tb = None
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(tb_dir)
        if tb is not None or wandb:
            self.writer = ScalarSinks(tb, WandbSink(**wandb) if wandb else None)
        if jsonl_path:
            os.makedirs(os.path.dirname(jsonl_path) or ".", exist_ok=True)
            self.jsonl = open(jsonl_path, "a")
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            disable=None)   # no \r lines when stdout is not a terminal (logs)
        self.print(f"MFU peak: {peak / 1e12:.2f} TFLOP/s per device ({peak_src})")

    def print(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm, skipped: int, log: bool,
             data_wait: float = 0.0) -> None:
        """Called every step on every rank (cheap); logs on rank 0 every ``log_interval``.
        ``data_wait``: seconds this step waited for its batch (the prefetch was not ready)."""
        self._steps += 1
        self._wait += data_wait
        if self.first_step_compiles:
            self._compile_step(step, loss, lr)
            return
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
        if not log:
            self._jsonl({"step": step, "loss": loss, "lr": lr})
            return
        dt, wait_ms = (time.perf_counter() - self._t) / self._steps, 1e3 * self._wait / self._steps
        self._t, self._steps, self._wait = time.perf_counter(), 0, 0.0
        tok_s = self.tokens_per_step / dt
        flops_dev = self.flops_per_token * tok_s / self.world
        gn = float(grad_norm) if grad_norm is not None else None  # ZeRO-0 fp32 does not expose it
        eta = (self.total - step) * dt
        if flops_dev > self.peak:   # the peak was measured low (a busy moment): never report MFU > 100%
            self.print(f"warning: {flops_dev / 1e12:.3f} TFLOP/s per device beats the peak "
                       f"{self.peak / 1e12:.3f}: raising the peak to it")
            self.peak = flops_dev
        scalars = {"loss": loss, "lr": lr, "tokens_per_s": tok_s, "tflops_per_device": flops_dev / 1e12,
                   "mfu": flops_dev / self.peak, "memory_gib": memory_gib(), "skipped_steps": skipped,
                   "data_wait_ms": wait_ms}
        if gn is not None:
            scalars["grad_norm"] = gn
        self.print(f"step {step:>6}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                   f"{'n/a' if gn is None else format(gn, '.3f')} | "
                   f"{tok_s:,.0f} tok/s | {flops_dev / 1e12:.3f} TFLOP/s/dev | MFU {100 * scalars['mfu']:.1f}% | "
                   f"data wait {wait_ms:.1f} ms | mem {scalars['memory_gib']:.2f} GiB | skipped {skipped} | "
                   f"ETA {eta / 60:.1f} min")
        self._jsonl({"step": step, **scalars})
        self._scalars(step, {f"train/{k}": v for k, v in scalars.items()})

    def _compile_step(self, step: int, loss: float, lr: float) -> None:
        """The first step of a compiled run (it traces and compiles the blocks): its whole time is
        logged as ``compile_s`` and the throughput timer restarts after it, so tok/s and MFU count
        only compiled steps."""
        compile_s = time.perf_counter() - self._t
        self.first_step_compiles = False
        self.reset_timer()
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
        self.print(f"step {step:>6}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | compile {compile_s:.1f} s "
                   f"(torch.compile's first step: not in throughput or MFU)")
        self._jsonl({"step": step, "loss": loss, "lr": lr, "compile_s": compile_s})
        self._scalars(step, {"train/compile_s": compile_s})

    def eval(self, step: int, loss: float) -> None:
        import math
        ppl = math.exp(min(loss, 50.0))
        self.print(f"step {step:>6} | validation loss {loss:.4f} | perplexity {ppl:.2f}")
        self._jsonl({"step": step, "val_loss": loss, "val_ppl": ppl})
        self._scalars(step, {"valid/loss": loss, "valid/perplexity": ppl})

    def log_scalars(self, step: int, scalars: dict) -> None:
        """Named scalars (e.g. ``{"eval/copa/acc": 0.61}``) into the jsonl log (under their own names),
        tensorboard and W&B at ``step``; rank 0 only, a no-op elsewhere. tools/report.py plots them."""
        if self.rank != 0:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl({"step": step, **scalars})
        self._scalars(step, scalars)

    def _jsonl(self, record: dict) -> None:
        if self.rank == 0 and self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def _scalars(self, step: int, scalars: dict) -> None:
        """The same tagged scalars to every scalar sink (``writer``: tensorboard and/or W&B)."""
        if self.writer:
            self.writer.add_scalars(scalars, step)

    def reset_timer(self) -> None:
        """Exclude eval/checkpoint time from the next throughput figure."""
        self._t, self._steps, self._wait = time.perf_counter(), 0, 0.0

    def close(self) -> None:
        for sink in (self.bar, self.writer, self.jsonl):
            if sink is not None:
                sink.close()
        self.bar = self.writer = self.jsonl = None   # closing twice (error paths) is harmless
