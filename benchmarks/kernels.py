"""Fused-kernel benchmarks: LayerNorm/RMSNorm GB/s and causal attention TFLOP/s vs PyTorch.

    python benchmarks/kernels.py            # CUDA: fused vs torch; CPU: references only, small sizes

Targets on one H100 (see docs/benchmarks.md "Kernels"): LayerNorm fwd+bwd >= 80% of the measured
device copy bandwidth; Triton attention fwd+bwd >= 1.0x torch SDPA (flash backend). Every row's
baseline is timed in the same run, interleaved with the candidate, after warm-up; the median of
``--reps`` (>= 5) timings is reported with the ratio.
"""
import argparse
import functools
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F

from megagpt_kernels import reference

from _bench import bench, print_table

GPU_SIZES = dict(norm_shapes=[(16384, n) for n in (1024, 2048, 4096, 8192)] + [(16384, 5120 + 7)],
                 seqs=[512, 1024, 2048, 4096, 8192], head_dims=[64, 128], hidden=2048, tokens=16384,
                 eager_max_bytes=24 << 30, ce_shape=(8192, 50304), gelu_shape=(16384, 8192))
CPU_SIZES = dict(norm_shapes=[(2048, 256), (2048, 1024)], seqs=[128, 512], head_dims=[64], hidden=256,
                 tokens=1024, eager_max_bytes=1 << 30, ce_shape=(512, 8192), gelu_shape=(1024, 1024))


def _fwd_bwd(fn, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(dy)
    return run


def norm_rows(args, cuda: bool, dev: str, dtype):
    """LayerNorm/RMSNorm fwd+bwd; bytes = read x + write y (fwd) + read x, dy + write dx (bwd)."""
    impls = {"torch F.layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)}
    rms_impls = {"reference rms_norm": lambda x, w, b: reference.rms_norm(x, w, 1e-6)}
    if cuda:
        from megagpt_kernels.triton.layer_norm import layer_norm as tln
        from megagpt_kernels.triton.rms_norm import rms_norm as trms
        impls["triton layer_norm"] = lambda x, w, b: tln(x, w, b, 1e-5)
        rms_impls["triton rms_norm"] = lambda x, w, b: trms(x, w, 1e-6)
        try:
            from megagpt_kernels.cuda import layer_norm as cln
            cln.load()
            impls["cuda layer_norm"] = lambda x, w, b: cln.layer_norm(x, w, b, 1e-5)
        except Exception as e:
            print(f"# cuda layer_norm unavailable: {e}")
    rows = []
    for m, n in args.norm_shapes:
        x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=dtype)
        y = torch.empty_like(dy)
        fns = {"copy": lambda: y.copy_(dy)}
        fns.update({k: _fwd_bwd(f, (x, w, b), dy) for k, f in {**impls, **rms_impls}.items()})
        t = bench(fns, args.reps, cuda)
        es = x.element_size()
        copy_gbs = 2 * m * n * es / t["copy"] / 1e9
        rows.append(("copy (read+write once)", f"{m}x{n}", f"{t['copy'] * 1e3:.3f}", f"{copy_gbs:.1f}", "1.00", "-"))
        for k in list(fns)[1:]:
            gbs = 5 * m * n * es / t[k] / 1e9
            base = "torch F.layer_norm" if "layer_norm" in k else "reference rms_norm"
            rows.append((k, f"{m}x{n}", f"{t[k] * 1e3:.3f}", f"{gbs:.1f}", f"{gbs / copy_gbs:.2f}",
                         f"{t[base] / t[k]:.2f}"))
    print_table(["impl", "rows x hidden", "ms", "GB/s", "vs copy BW", "speedup vs torch"], rows,
                f"Norm fwd+bwd ({str(dtype).replace('torch.', '')})")


def _vs_reference(fns, args, cuda, shape, nbytes):
    """Rows of impl, shape, ms, GB/s, speedup vs the first (reference) entry of fns."""
    t = bench(fns, args.reps, cuda)
    base = next(iter(fns))
    return [(k, shape, f"{t[k] * 1e3:.3f}", f"{nbytes / t[k] / 1e9:.1f}", f"{t[base] / t[k]:.2f}") for k in fns]


def extras_rows(args, cuda: bool, dev: str, dtype):
    """Optional kernels, fwd+bwd: vocab cross-entropy (bytes = logits read twice + grad written)
    and bias+GELU (x, dy read, y, dx written), vs their PyTorch references."""
    ce = {"reference cross_entropy": reference.cross_entropy}
    bg = {"reference bias_gelu": lambda x, b: reference.bias_gelu(x, b, "tanh")}
    if cuda:
        from megagpt_kernels.triton.bias_gelu import bias_gelu
        from megagpt_kernels.triton.cross_entropy import cross_entropy
        ce["triton cross_entropy"] = cross_entropy
        bg["triton bias_gelu"] = lambda x, b: bias_gelu(x, b, "tanh")
    n, v = args.ce_shape
    logits = torch.randn(n, v, device=dev, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), device=dev)
    one = torch.ones((), device=dev)
    fns = {k: _fwd_bwd(lambda x, f=f: f(x, labels), (logits,), one) for k, f in ce.items()}
    rows = _vs_reference(fns, args, cuda, f"{n}x{v}", 3 * n * v * logits.element_size())
    m, h = args.gelu_shape
    x = torch.randn(m, h, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(h, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, h, device=dev, dtype=dtype)
    fns = {k: _fwd_bwd(f, (x, b), dy) for k, f in bg.items()}
    rows += _vs_reference(fns, args, cuda, f"{m}x{h}", 4 * m * h * x.element_size())
    print_table(["impl", "shape", "ms", "GB/s", "speedup vs reference"], rows,
                f"Cross-entropy and bias+GELU fwd+bwd ({str(dtype).replace('torch.', '')})")


def eager_causal_attention(q, k, v):
    t = q.shape[2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def attention_rows(args, cuda: bool, dev: str, dtype):
    """Causal attention; FLOPs = 4*B*H*T^2*D/2 forward, x3.5 for fwd+bwd (backward = 2.5x forward)."""
    impls = {"eager": eager_causal_attention}
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from megagpt_kernels.triton.flash_attention import attention as tri

        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        impls = {"torch SDPA (flash)": sdpa_flash, "triton flash": lambda q, k, v: tri(q, k, v, True), **impls}
    else:
        impls = {"torch SDPA (cpu)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), **impls}
    base = next(iter(impls))
    rows = []
    for d in args.head_dims:
        for t in args.seqs:
            h = args.hidden // d
            bsz = max(1, args.tokens // t)
            q, k, v = (torch.randn(bsz, h, t, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(bsz, h, t, d, device=dev, dtype=dtype)
            fwd_flops = 4 * bsz * h * t * t * d / 2
            use = dict(impls)
            if "eager" in use and bsz * h * t * t * 6 > args.eager_max_bytes:
                del use["eager"]  # the (T, T) score matrix would not fit
            for mode, mult, grad in (("fwd", 1.0, False), ("fwd+bwd", 3.5, True)):
                fns = {k_: _fwd_bwd(f, (q, k, v), do) if grad else functools.partial(f, q, k, v)
                       for k_, f in use.items()}
                with torch.set_grad_enabled(grad):
                    tm = bench(fns, args.reps, cuda)
                for name, sec in tm.items():
                    rows.append((name, mode, f"{bsz}x{h}x{t}x{d}", f"{sec * 1e3:.3f}",
                                 f"{fwd_flops * mult / sec / 1e12:.3f}", f"{tm[base] / sec:.2f}"))
    print_table(["impl", "pass", "BxHxTxD", "ms", "TFLOP/s", f"speedup vs {base}"], rows,
                f"Causal attention ({str(dtype).replace('torch.', '')})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", choices=["norm", "attention", "extras"], default=None)
    a = p.parse_args(argv)
    if a.reps < 5:
        p.error("--reps must be >= 5 (median of at least 5)")
    cuda = torch.cuda.is_available()
    if cuda:
        dev, dtype, machine = "cuda", torch.bfloat16, torch.cuda.get_device_name()
    else:
        dev, dtype = "cpu", torch.float32
        machine = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    vars(a).update(GPU_SIZES if cuda else CPU_SIZES)
    print(f"# megagpt kernels benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, "
          f"torch {torch.__version__}, median of {a.reps} interleaved timings after warm-up")
    if not cuda:
        print("# No CUDA device: only the PyTorch references run (fp32, small sizes). The fused Triton/CUDA "
              "kernels need a GPU; their figures are pending a GPU run.")
    for name, rows in (("norm", norm_rows), ("attention", attention_rows), ("extras", extras_rows)):
        if a.only in (None, name):
            rows(a, cuda, dev, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
