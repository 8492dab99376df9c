"""CPU training throughput: megagpt under DeepSpeed (ZeRO-0/1, 1 process) vs megagpt in a bare
torch loop vs HF transformers GPT2LMHeadModel with the same shape, batch and optimizer (AdamW,
clip 1.0, fp32). Measured in one process, interleaved in rounds after warm-up; median of the
rounds. Achieved model FLOP/s (PaLM 6N + 12LHQT) is also shown as a fraction of fp32 torch.mm
FLOP/s measured in the same run.

``--bf16`` adds megagpt under DeepSpeed ZeRO-1 with ``bf16.enabled`` (bf16 weights and activations,
fp32 master weights and Adam state in DeepSpeed's bf16 optimizer), eager and with ``train.compile``,
next to the same engine in fp32, with bf16 ``torch.mm`` FLOP/s measured in the same rounds: their
MFU is against the bf16 peak, the fp32 contenders' against the fp32 peak (AMX CPUs run bf16 matmuls
several times faster). On a shared host the bf16 (AMX) matmul rate can swing 2x within seconds
while fp32 holds steady, so each round also prints its own bf16/fp32 ``torch.mm`` ratio beside
its bf16/fp32 step ratios.

``--compile`` adds megagpt with ``train.compile`` (each block under torch.compile) next to the same
engine eager, under ZeRO-0 and ZeRO-3; the first (compiling) step of each is timed apart and
reported as compile time, never averaged into the step times.

    python benchmarks/train_throughput.py [--layers 4 --width 256 --seq 256 --batch 8 --rounds 7 --steps 4]
                                          [--compile] [--bf16]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _bench import bench, print_table  # noqa: E402
from megagpt.train.compile import compile_blocks  # noqa: E402
from megagpt.train.optim import param_groups  # noqa: E402


def matmul_flops(m, k, n, reps=10, dtype=torch.float32):
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / bench({"mm": lambda: torch.mm(a, b)}, reps)["mm"]


def make_megagpt(a, compiled=False):
    from megagpt.model import GPT, get_preset
    cfg = get_preset("tiny-gpt2", vocab_size=a.vocab, n_layer=a.layers, n_embd=a.width, n_head=a.width // 64,
                     max_seq_len=a.seq, pad_vocab_multiple=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    compile_blocks(model, compiled)
    return model


def make_hf(a):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.width, n_layer=a.layers,
                     n_head=a.width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


class Bare:
    """Plain torch: forward, backward, clip, AdamW step."""

    def __init__(self, model, hf=False):
        self.model, self.hf = model, hf
        groups = ([{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.01},
                   {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
                  if hf else param_groups(model, 0.01))
        self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

    def step(self, x, y):
        loss = self.model(input_ids=x, labels=x).loss if self.hf else self.model(x, labels=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


class Engine:
    """megagpt under deepspeed.initialize (optimizer, clipping from the ds config)."""

    def __init__(self, model, stage, batch, bf16=False):
        import deepspeed
        ds = {"bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "train_batch_size": batch,
              "gradient_clipping": 1.0, "steps_per_print": 10**9, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                       "weight_decay": 0.01}}}
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds)

    def step(self, x, y):
        loss = self.engine(x, labels=y)
        self.engine.backward(loss)
        self.engine.step()
        return loss


def main():
    p = argparse.ArgumentParser()
    for name, default in (("layers", 4), ("width", 256), ("seq", 256), ("batch", 8), ("vocab", 1024), ("rounds", 7)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--compile", action="store_true", help="add train.compile contenders (ZeRO-0 and ZeRO-3, eager "
                                                          "and compiled) and report their compile time")
    p.add_argument("--bf16", action="store_true", help="add megagpt + DeepSpeed ZeRO-1 in bf16 (MFU against the "
                                                       "bf16 matmul peak)")
    a = p.parse_args()

    from megagpt.train.distributed import init_distributed
    init_distributed()  # 1-rank gloo group for the DeepSpeed engines

    ref = make_megagpt(a)
    flops_per_step = ref.flops_per_token(a.seq) * a.batch * a.seq
    z0, z1, bare, hf = ("megagpt + DeepSpeed ZeRO-0", "megagpt + DeepSpeed ZeRO-1", "megagpt bare torch loop",
                        "HF GPT2LMHeadModel bare loop")
    contenders = {z0: Engine(make_megagpt(a), 0, a.batch), z1: Engine(make_megagpt(a), 1, a.batch),
                  bare: Bare(make_megagpt(a)), hf: Bare(make_hf(a), hf=True)}
    z3, c0, c3 = ("megagpt + DeepSpeed ZeRO-3", "megagpt + DeepSpeed ZeRO-0, compiled",
                  "megagpt + DeepSpeed ZeRO-3, compiled")
    b1, b1c = "megagpt + DeepSpeed ZeRO-1, bf16", "megagpt + DeepSpeed ZeRO-1, bf16, compiled"
    if a.bf16:
        contenders[b1] = Engine(make_megagpt(a), 1, a.batch, bf16=True)
        contenders[b1c] = Engine(make_megagpt(a, True), 1, a.batch, bf16=True)
    if a.compile:
        contenders.update({z3: Engine(make_megagpt(a), 3, a.batch), c0: Engine(make_megagpt(a, True), 0, a.batch),
                           c3: Engine(make_megagpt(a, True), 3, a.batch)})
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)]
    xs = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]

    def run(c, n):
        t0 = time.perf_counter()
        for i in range(n):
            x, y = xs[i % len(xs)]
            c.step(x, y)
        return (time.perf_counter() - t0) / n

    first = {}   # the first step of each contender, timed apart: for the compiled ones, compilation
    for name, c in contenders.items():
        first[name] = run(c, 1)
        run(c, a.warmup)
    times = {k: [] for k in contenders}
    mm, mm_bf16 = [], []
    for r in range(a.rounds):
        mm.append(matmul_flops(1024, 1024, 1024))
        if a.bf16:
            mm_bf16.append(matmul_flops(1024, 1024, 1024, dtype=torch.bfloat16))
        order = list(contenders.items())
        order = order[r % len(order):] + order[:r % len(order)]  # rotate so no one always goes first
        for name, c in order:
            times[name].append(run(c, a.steps))
    peak = statistics.median(mm)
    bf16s = (b1, b1c)
    peaks = {k: statistics.median(mm_bf16) if k in bf16s else peak for k in contenders}   # the dtype's own peak
    best_peaks = {k: max(mm_bf16) if k in bf16s else max(mm) for k in contenders}
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # the machine may be shared: ratios taken within each round (seconds apart) are steadier
    # than ratios of medians, so the headline ratios are medians of per-round ratios
    def ratio(a_, b_):
        return statistics.median(x / y for x, y in zip(times[a_], times[b_]))
    tok = a.batch * a.seq
    print(f"config: {a.layers} layers, width {a.width}, {a.width // 64} heads, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}; {ref.num_params():,} params; {flops_per_step / 1e9:.2f} GFLOP/step (PaLM)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"fp32 torch.mm 1024^3: {peak / 1e9:.1f} GFLOP/s (median of {a.rounds})"
          + (f"; bf16: {statistics.median(mm_bf16) / 1e9:.1f} GFLOP/s ({statistics.median(mm_bf16) / peak:.2f}x)"
             if a.bf16 else ""))
    print_table(["contender", "median ms/step", "tokens/s", "GFLOP/s", "% of its dtype's mm", "best ms/step",
                 "best % of mm", "speed vs ZeRO-0 eager"],
                [(k, f"{1e3 * t:.1f}", f"{tok / t:,.0f}", f"{flops_per_step / t / 1e9:.1f}",
                  f"{100 * flops_per_step / t / peaks[k]:.1f}%", f"{1e3 * best[k]:.1f}",
                  f"{100 * flops_per_step / best[k] / best_peaks[k]:.1f}%", f"{ratio(z0, k):.2f}x")
                 for k, t in med.items()])
    if a.bf16:
        print(f"bf16 vs fp32, megagpt + DeepSpeed ZeRO-1 (median per-round ratio of tokens/s; target >= 2x, aim "
              f"2.5x): eager {ratio(z1, b1):.2f}x, compiled {ratio(z1, b1c):.2f}x; compiled vs eager bf16 "
              f"{ratio(b1, b1c):.2f}x; compile s (first step - median) {first[b1c] - med[b1c]:.1f}")
        print_table(["round", "fp32 mm GFLOP/s", "bf16 mm GFLOP/s", "bf16/fp32 mm", "bf16 eager vs fp32",
                     "bf16 compiled vs fp32"],
                    [(str(r + 1), f"{mm[r] / 1e9:.0f}", f"{mm_bf16[r] / 1e9:.0f}", f"{mm_bf16[r] / mm[r]:.2f}x",
                      f"{times[z1][r] / times[b1][r]:.2f}x", f"{times[z1][r] / times[b1c][r]:.2f}x")
                     for r in range(a.rounds)], title="bf16 per round (ZeRO-1 fp32 step time / bf16 step time)")
    if a.compile:
        print_table(["contender", "first step s", "median step s", "compile s (first - median)",
                     "compiled vs eager, same stage (median per-round ratio)"],
                    [(k, f"{first[k]:.2f}", f"{med[k]:.3f}", f"{first[k] - med[k]:.2f}",
                      f"{ratio(e, k):.3f}x" + (" faster" if ratio(e, k) > 1 else " (slower)"))
                     for k, e in ((c0, z0), (c3, z3))], title="train.compile")
    print(f"megagpt+DeepSpeed ZeRO-0 vs HF: {ratio(hf, z0):.2f}x faster (target >= 1.3x); "
          f"megagpt bare vs HF: {ratio(hf, bare):.2f}x")
    print(f"engine overhead vs bare loop (median per-round ratio): ZeRO-0 {100 * (ratio(z0, bare) - 1):+.1f}%, "
          f"ZeRO-1 {100 * (ratio(z1, bare) - 1):+.1f}% (target <= 5%)")
    print(f"achieved/matmul, ZeRO-0: median {100 * flops_per_step / med[z0] / peak:.1f}%, best step vs best mm "
          f"{100 * flops_per_step / best[z0] / max(mm):.1f}% (target >= 60%)")
    if a.json:
        json.dump({"ms_per_step": {k: 1e3 * v for k, v in med.items()}, "mm_flops": peak, "mm_flops_bf16": mm_bf16,
                   "first_step_s": first,
                   "flops_per_step": flops_per_step, "rounds": times}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
