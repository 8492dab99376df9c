#!/usr/bin/env python
"""Which TP x PP x DP layouts fit a model on a cluster, with per-GPU memory and estimated step
time / MFU / achieved TFLOP/s per GPU. Formulas, constants and the check of the time model against
Megatron-LM's published A100 runs: docs/planner.md.

    python tools/plan.py --preset gpt2-xl --seq-length 1024 --global-batch 512 --micro-batch 4 \\
        --gpus 16 --gpus-per-node 8 --gpu a100 --dtype bf16 --zero-stage 1
"""
import argparse
import json
from dataclasses import fields

from megagpt.errors import MegaGPTError, cli_main
from megagpt.cluster.plan import GIB, GPU_PRESETS, Cluster, ModelShape, TrainSetup, describe, layouts


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout, and ``(default: X)`` unless the help already words it (None needs words)."""

    def _get_help_string(self, action):
        if action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model (a preset, or explicit sizes; explicit sizes override the preset)")
    g.add_argument("--preset", help="megagpt.model preset name, e.g. gpt2-small (default: none; then give every size)")
    sizes = {"layers": "transformer layers", "hidden": "model width (n_embd)", "heads": "attention heads",
             "vocab": "vocabulary size", "ffn": "MLP hidden width"}
    for name, what in sizes.items():
        g.add_argument(f"--{name}", type=int, help=f"{what} (default: the preset's)")
    g.add_argument("--kv-heads", type=int, help="key/value heads, GQA/MQA (default: the preset's, else --heads)")
    g.add_argument("--activation", choices=("gelu", "swiglu"),
                   help="MLP type, swiglu has 3 matrices (default: the preset's, else gelu)")
    g.add_argument("--seq-length", type=int, help="training sequence length (default: the preset's max)")
    t = p.add_argument_group("training")
    t.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    t.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    t.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="training precision")
    t.add_argument("--zero-stage", default="1", help="0, 1, 2, 3 or 'all' to compare them")
    t.add_argument("--offload-optimizer", action="store_true", help="optimizer states in CPU memory (ZeRO offload)")
    t.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameter offload")
    t.add_argument("--checkpoint-activations", action="store_true",
                   help="keep only layer inputs; recompute in backward")
    t.add_argument("--sequence-parallel", action="store_true", help="split norm/dropout activations across TP ranks")
    t.add_argument("--no-flash", action="store_true", help="attention stores the s x s scores")
    t.add_argument("--dropout", action="store_true", help="count dropout masks")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus", type=int, required=True, help="total GPUs")
    c.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; TP stays inside a node")
    c.add_argument("--gpu", choices=sorted(GPU_PRESETS), default="h100",
                   help="GPU type: the starting values of the six flags below (docs/planner.md)")
    c.add_argument("--reserve-gib", type=float, default=2.0, help="per GPU, not for the model")
    hw = {"gpu_mem_gib": "memory per GPU in GiB", "peak_tflops": "dense 16-bit peak TFLOP/s per GPU",
          "efficiency": "achieved fraction of peak for the matmuls", "intra_node_gbps": "NVLink GB/s per GPU per direction",
          "inter_node_gbps": "network GB/s per GPU per direction", "hbm_gbps": "GPU memory GB/s"}
    for name, what in hw.items():
        presets = ", ".join(f"{g} {v[name]:g}" for g, v in sorted(GPU_PRESETS.items()))
        c.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{what} (default: the --gpu preset's: {presets})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--top", type=int, default=20, help="rows in the table (0 = all)")
    return p


def model_shape(a):
    sizes = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "vocab": a.vocab, "ffn": a.ffn}
    if a.preset:
        from megagpt.model import get_preset

        shape = ModelShape.from_config(get_preset(a.preset), a.seq_length)
        over = {k: v for k, v in sizes.items() if v is not None}
        over.update({k: v for k, v in (("kv_heads", a.kv_heads), ("activation", a.activation)) if v})
        return ModelShape(**{**shape.__dict__, **over})
    missing = [f"--{k}" for k, v in sizes.items() if v is None]
    if missing or a.seq_length is None:
        raise MegaGPTError(f"give --preset or all of --layers --hidden --heads --vocab --ffn --seq-length "
                           f"(missing: {' '.join(missing + ([] if a.seq_length else ['--seq-length']))})")
    return ModelShape(**sizes, seq_length=a.seq_length, kv_heads=a.kv_heads or 0, activation=a.activation or "gelu")


def check_sizes(a):
    """Every given count is >= 1 (before the model's shape is read from them)."""
    for name in ("global_batch", "micro_batch", "gpus", "gpus_per_node", "layers", "hidden", "heads", "vocab", "ffn",
                 "kv_heads", "seq_length"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise MegaGPTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")


def check(a, m):
    if m.hidden % m.heads or m.heads % m.kv:
        raise MegaGPTError(f"--hidden {m.hidden} must divide by --heads {m.heads}, and heads by kv heads {m.kv}")
    if a.zero_stage not in ("0", "1", "2", "3", "all"):
        raise MegaGPTError(f"--zero-stage must be 0, 1, 2, 3 or all, got {a.zero_stage!r}")
    for name in ("gpu_mem_gib", "peak_tflops", "efficiency", "intra_node_gbps", "inter_node_gbps", "hbm_gbps"):
        v = getattr(a, name)
        if v is not None and not (v > 0 and (name != "efficiency" or v <= 1)):
            limit = "in (0, 1]" if name == "efficiency" else "> 0"
            raise MegaGPTError(f"--{name.replace('_', '-')} must be {limit}, got {v:g}")
    if a.offload_params and a.zero_stage not in ("3", "all"):
        raise MegaGPTError("--offload-params needs --zero-stage 3")


def row_text(stage, r):
    gib = " ".join(f"{r['memory'][k] / GIB:>7.2f}" for k in ("params", "grads", "optimizer", "activations", "working"))
    t = r["time"]
    return (f"{stage:>4} {r['tp']:>3} {r['pp']:>3} {r['dp']:>4} {r['micro_batches']:>4} {gib} {r['mem_gib']:>7.2f} "
            f"{'yes' if r['fits'] else 'NO':>4} {t['step_s']:>8.3f} {100 * t['mfu']:>5.1f} {t['hw_tflops_per_gpu']:>7.1f} "
            f"{t['tokens_per_s']:>10.0f}")


@cli_main
def main(argv=None):
    a = build_parser().parse_args(argv)
    check_sizes(a)
    m = model_shape(a)
    check(a, m)
    given = {f.name: getattr(a, f.name) for f in fields(Cluster) if getattr(a, f.name, None) is not None}
    cluster = Cluster(**{**GPU_PRESETS[a.gpu], **given, "num_gpus": a.gpus})
    rows = []
    for z in range(4) if a.zero_stage == "all" else [int(a.zero_stage)]:
        setup = TrainSetup(global_batch=a.global_batch, micro_batch=a.micro_batch, dtype=a.dtype, zero_stage=z,
                           offload_optimizer=a.offload_optimizer, offload_params=a.offload_params and z == 3,
                           activation_checkpointing=a.checkpoint_activations, sequence_parallel=a.sequence_parallel,
                           flash_attention=not a.no_flash, dropout=a.dropout)
        rows += [dict(r, zero_stage=z) for r in layouts(m, setup, cluster)]
    rows.sort(key=lambda r: (not r["fits"], r["time"]["step_s"], r["mem_gib"]))
    if not rows:
        raise MegaGPTError(f"no TP x PP x DP layout of {a.gpus} GPUs divides heads={m.heads}, layers={m.layers} "
                           f"and global batch {a.global_batch} (micro batch {a.micro_batch})")
    if a.json:
        print(json.dumps({**describe(m, setup, cluster), "layouts": rows}, indent=1))
        return
    print(f"model: {m.total_params() / 1e6:.1f}M params, {m.layers} layers, hidden {m.hidden}, "
          f"{m.heads} heads, seq {m.seq_length}; {a.gpus} {a.gpu.upper()} x {cluster.gpu_mem_gib:g} GiB; {a.dtype}")
    print("zero  tp  pp   dp   mb  params   grads     opt    acts    work   total fits   step_s   mfu  TFLOP/s   tokens/s")
    for r in rows[: a.top or None]:
        print(row_text(r["zero_stage"], r))
    fits = sum(r["fits"] for r in rows)
    print(f"{fits} of {len(rows)} layouts fit (memory in GiB per GPU; mb = micro-batches per step; TFLOP/s = "
          f"achieved per GPU, recomputation included)")


if __name__ == "__main__":
    main()
