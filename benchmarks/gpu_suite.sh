#!/usr/bin/env bash
# Every check that needs CUDA, on one GPU, in one bounded run (<= 8 minutes), written up as one markdown report.
#
#   bash benchmarks/gpu_suite.sh [--out REPORT.md] [--steps 50] [--workdir DIR] [--budget SECONDS] [--only CHECK]
#   bash benchmarks/gpu_suite.sh --dry-run [--out REPORT.md]     # CPU: validate every command line, run nothing heavy
#
# Checks (each one command under `timeout`, its output in WORKDIR/logs/CHECK.log, one report section each):
#   kernel_tests   the fused Triton kernels compiled on CUDA (no interpreter) vs the PyTorch references, fwd+bwd
#   kernel_bench   benchmarks/kernels.py (LayerNorm fwd+bwd >= 80% of copy bandwidth; attention fwd+bwd >= 1.0x
#                  SDPA's flash backend at T = 1k-8k, causal, head dim 64/128)
#   preprocess     tools/preprocess_data.py: tinyshakespeare with the GPT-2 BPE (or a generated corpus and a
#                  sentencepiece tokenizer trained on it when ../shared/data is absent)
#   pretrain_bf16  deepspeed --num_gpus 1 megagpt/train/pretrain.py: gpt2-small, seq 1024, bf16, ZeRO-1, --steps
#                  steps; MFU of the last logged step (target >= 45% on an H100-class GPU)
#   pretrain_fp16  the same model in fp16 with dynamic loss scaling (ds_configs/zero1_fp16.json)
#   pretrain_zero3_offload  the same model under ZeRO-3 with parameters and optimizer offloaded to CPU
# A failing check is reported as failed and the suite goes on; exit status 1 if any check failed (a missed
# performance target is reported, not an exit status). The suite stops starting checks once --budget seconds
# (default 460) are spent, and no check runs past it.
#
# --dry-run (no CUDA needed): prints each exact command, validates it cheaply (every referenced file exists, every
# flag is in the entry point's --help, pretrain.py's own config + DeepSpeed-config validation on the written
# config, the kernel check in Triton's CPU interpreter at tiny sizes, the real preprocessing of the small corpus),
# and writes the report skeleton with each check marked "dry-run". Exit 0 if every command line is valid, else 1
# naming the bad check(s) on stderr. tests/test_gpu_suite.py runs it.
set -euo pipefail

REPO=${GPU_SUITE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PY=${PYTHON:-python3}
DRY=0
OUT=gpu_suite_report.md
STEPS=50
WORK=
BUDGET=460
ONLY=
ALL_CHECKS="kernel_tests kernel_bench preprocess pretrain_bf16 pretrain_fp16 pretrain_zero3_offload"

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        --workdir) WORK=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ $STEPS =~ ^[1-9][0-9]*0$ ]]; then   # the fp16 / ZeRO-3 runs take 2/5 and 1/5 of it, each logs its last step
    echo "gpu_suite.sh: --steps must be a positive multiple of 10" >&2
    exit 2
fi
for c in ${ONLY//,/ }; do
    [[ " $ALL_CHECKS " == *" $c "* ]] || { echo "gpu_suite.sh: --only $c: not one of: $ALL_CHECKS" >&2; exit 2; }
done

if [[ ,$ONLY, == *,pretrain_* && ,$ONLY, != *,preprocess,* ]]; then
    ONLY+=",preprocess"   # the pretraining checks read its shards
fi
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/megagpt_gpu_suite.XXXXXX")}
rm -rf "${WORK:?}/help"   # the --help texts cached by the last dry-run
mkdir -p "$WORK/logs" "$WORK/data" "$WORK/cache"
WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs
HELPER=$WORK/suite_helper.py
cd "$REPO"
export PYTHONUNBUFFERED=1
SUITE_START=$(date +%s)

# ----------------------------------------------------------------------------------------------------------------
# The Python side: version header, fallback corpus, the compiled-kernel check, command validation, log parsing.
cat > "$HELPER" <<'PYEOF'
"""gpu_suite.sh's helper (written by the suite into its work dir): versions | corpus | kernel-check |
flags | validate-pretrain | parse."""
import math
import os
import re
import subprocess
import sys


def versions():
    import importlib.metadata as md
    out = [f"python {sys.version.split()[0]}"]
    for pkg in ("torch", "triton", "deepspeed"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    import torch
    cuda = torch.cuda.is_available()
    out.append(f"CUDA {torch.version.cuda or 'none'}, device: {torch.cuda.get_device_name() if cuda else 'none'}")
    print(", ".join(out))
    return 0


def corpus(path, mb=2.0):
    """A deterministic English-like corpus (paragraphs of sentences over a 3000-word vocabulary)."""
    import random
    rng = random.Random(1234)
    syll = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ar", "en", "is", "on")]
    words = list(dict.fromkeys("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)))
    weights = [1.0 / (i + 10) for i in range(len(words))]   # Zipf-like
    n, paras = 0, []
    while n < mb * 1e6:
        sents = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(words, weights, k=rng.randint(5, 18))
            sents.append(" ".join(w).capitalize() + rng.choice([".", ".", "?", "!"]))
        paras.append(" ".join(sents))
        n += len(paras[-1]) + 2
    with open(path, "w") as f:
        f.write("\n\n".join(paras) + "\n")
    print(f"wrote {path}: {n / 1e6:.1f} MB, {len(paras)} paragraphs")
    return 0


def kernel_check(tiny):
    """Each Triton kernel vs its reference, fwd + bwd. A case passes if the kernel's max error against a
    float64 reference is <= 2x the error of the PyTorch reference run in the same dtype, plus a floor."""
    import torch
    from megagpt_kernels import reference as ref
    from megagpt_kernels.triton import interpreting
    cuda = torch.cuda.is_available()
    if cuda and interpreting():
        print("error: TRITON_INTERPRET is set: this check is for compiled kernels")
        return 2
    if not cuda and not interpreting():
        print("error: no CUDA device and TRITON_INTERPRET unset: nothing can run the kernels")
        return 2
    from megagpt_kernels.triton.bias_gelu import bias_gelu
    from megagpt_kernels.triton.cross_entropy import cross_entropy
    from megagpt_kernels.triton.flash_attention import attention, _fwd
    from megagpt_kernels.triton.layer_norm import layer_norm
    from megagpt_kernels.triton.rms_norm import rms_norm
    mode = type(_fwd).__name__
    print(f"kernel-check: device {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"triton {'interpreter' if mode == 'InterpretedFunction' else 'compiled'} ({mode})")
    if cuda and mode == "InterpretedFunction":
        print("error: the kernels were defined interpreted")
        return 2
    dev = "cuda" if cuda else "cpu"
    floor = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    dtypes = [torch.float32, torch.bfloat16] if tiny else [torch.float32, torch.bfloat16, torch.float16]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float64) * scale + shift

    def grads(fn, xs, dy):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        y = fn(*leaves)
        y.backward(dy if dy is not None else torch.ones_like(y))
        return [y.detach()] + [t.grad for t in leaves]

    fails = []

    def case(name, kern, refn, xs, dy, dtype):
        want = grads(refn, xs, dy)                                 # float64 ground truth
        low = [x.to(dtype) for x in xs]
        dyl = dy.to(dtype) if dy is not None else None
        got, base = grads(kern, low, dyl), grads(refn, low, dyl)
        worst = []
        for i, (w, k, b) in enumerate(zip(want, got, base)):
            scale = max(w.abs().max().item(), 1e-6)
            ek, eb = ((t.double() - w).abs().max().item() / scale for t in (k, b))
            ok = math.isfinite(ek) and ek <= 2 * eb + floor[dtype]
            worst.append(f"{'y' if i == 0 else 'd' + str(i - 1)} {ek:.1e}/{eb:.1e}{'' if ok else ' FAIL'}")
            if not ok:
                fails.append(f"{name} {str(dtype)[6:]} output {i}")
        status = "FAIL" if any(w.endswith("FAIL") for w in worst) else "PASS"
        print(f"{status} {name} {str(dtype)[6:]}: rel err kernel/torch {'; '.join(worst)}")

    norm_shapes = [(9, 100)] if tiny else [(2048, 768), (333, 5127)]
    attn = ([(1, 2, 2, 40, 40, 16, True)] if tiny else     # B, Hq, Hkv, Tq, Tk, D, causal
            [(2, 4, 4, 1024, 1024, 64, True), (1, 8, 2, 1000, 1000, 128, True), (2, 4, 4, 256, 256, 64, False),
             (1, 4, 4, 100, 400, 64, True)])
    ce_shape = (7, 300) if tiny else (1024, 50304)
    gelu_shape = (9, 70) if tiny else (4096, 3072)
    for dtype in dtypes:
        for m, n in norm_shapes:
            x, w, b, dy = rnd(m, n, scale=3, shift=1), rnd(n), rnd(n), rnd(m, n)
            case(f"layer_norm {m}x{n}", lambda x, w, b: layer_norm(x, w, b, 1e-5),
                 lambda x, w, b: ref.layer_norm(x, w, b, 1e-5), (x, w, b), dy, dtype)
            case(f"rms_norm {m}x{n}", lambda x, w: rms_norm(x, w, 1e-6),
                 lambda x, w: ref.rms_norm(x, w, 1e-6), (x, w), dy, dtype)
        for bsz, hq, hkv, tq, tk, d, causal in attn:
            q, k, v, do = rnd(bsz, hq, tq, d), rnd(bsz, hkv, tk, d), rnd(bsz, hkv, tk, d), rnd(bsz, hq, tq, d)
            case(f"attention B{bsz} Hq{hq} Hkv{hkv} Tq{tq} Tk{tk} D{d} causal={causal}",
                 lambda q, k, v, c=causal: attention(q, k, v, c), lambda q, k, v, c=causal: ref.attention(q, k, v, c),
                 (q, k, v), do, dtype)
        n, vsz = ce_shape
        labels = torch.randint(0, vsz, (n,), generator=g, device=dev)
        labels[::7] = -100
        case(f"cross_entropy {n}x{vsz}", lambda x: cross_entropy(x, labels), lambda x: ref.cross_entropy(x, labels),
             (rnd(n, vsz, scale=2),), None, dtype)
        m, h = gelu_shape
        for approx in ("tanh", "none"):
            case(f"bias_gelu {m}x{h} {approx}", lambda x, b, a=approx: bias_gelu(x, b, a),
                 lambda x, b, a=approx: ref.bias_gelu(x, b, a), (rnd(m, h), rnd(h)), rnd(m, h), dtype)
    print(f"kernel-check: {len(fails)} failed" + (f": {', '.join(fails)}" if fails else ", all passed"))
    return 1 if fails else 0


OUTPUT_FLAGS = {"--output-prefix", "--save", "--out", "--tensorboard-dir", "--cache-dir"}


def _help(cmd):
    """``cmd``'s --help text, cached in the work dir for this suite run (each costs a torch import)."""
    import hashlib
    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "help",
                         hashlib.sha256(repr(cmd).encode()).hexdigest()[:16] + ".txt")
    if os.path.isfile(cache):
        return open(cache).read()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"invalid: `{' '.join(cmd)}` exited {p.returncode}: {(p.stdout + p.stderr)[-600:]}")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        f.write(p.stdout + p.stderr)
    return p.stdout + p.stderr


def _check_args(help_text, args, where):
    bad = []
    known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
    prev = None
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            if flag not in known:
                bad.append(f"{where}: flag {flag} is not in its --help")
        elif ("/" in a or re.search(r"\.(py|json|ya?ml|txt|model)$", a)) and prev not in OUTPUT_FLAGS:
            if not os.path.exists(a):
                bad.append(f"{where}: {a} does not exist")
        prev = a
    return bad


def flags(cmd):
    """cmd = [launcher...] python SCRIPT args | deepspeed LAUNCHER-ARGS SCRIPT args: files exist, flags known."""
    bad = []
    if cmd[0] == "env":   # env [-u VAR] [K=V] ... command
        i = 1
        while i < len(cmd) and (cmd[i] == "-u" or "=" in cmd[i] or cmd[i - 1] == "-u"):
            i += 1
        cmd = cmd[i:]
    if cmd[0] == "deepspeed":
        j = next((i for i, a in enumerate(cmd) if a.endswith(".py")), None)
        if j is None:
            return print("invalid: no .py script in the deepspeed command") or 1
        import shutil
        if shutil.which("deepspeed") is None:
            bad.append("the deepspeed launcher is not on PATH")
        else:
            bad += _check_args(_help(["deepspeed", "--help"]), cmd[1:j], "deepspeed launcher")
        script, args = cmd[j], cmd[j + 1:]
    elif os.path.basename(cmd[0]).startswith("python"):
        script, args = cmd[1], cmd[2:]
    else:
        return print(f"invalid: cannot validate a {cmd[0]} command") or 1
    if not os.path.isfile(script):
        bad.append(f"{script} does not exist")
    else:
        bad += _check_args(_help([sys.executable, script, "--help"]), args, script)
    for b in bad:
        print(f"invalid: {b}")
    if not bad:
        print(f"ok: {script}: every file exists and every flag is in --help")
    return 1 if bad else 0


def validate_pretrain(expect, argv):
    """pretrain.py's own checks (flags, the YAML, the DeepSpeed JSON with its "auto" values filled, the ZeRO
    stage) on ``argv`` exactly, with the training run itself replaced by a summary of what it would run."""
    sys.path.insert(0, os.getcwd())
    from megagpt.train import pretrain
    seen = {}

    def summary(cfg, ds, init_src=None):
        zero = ds.get("zero_optimization") or {}
        dtype = "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp16" if (ds.get("fp16") or {}).get(
            "enabled") else "fp32"
        seen.update(stage=str(zero.get("stage", 0)), dtype=dtype,
                    offload=(zero.get("offload_param") or {}).get("device", "none"),
                    optimizer_offload=(zero.get("offload_optimizer") or {}).get("device", "none"),
                    loss_scale=str((ds.get("fp16") or {}).get("loss_scale", "-")), preset=cfg.model.name,
                    seq=str(cfg.data.seq_length))
        t = cfg.train
        print(f"ok: pretrain.py accepts the command: model {cfg.model.name} ({cfg.model.n_layer} layers, width "
              f"{cfg.model.n_embd}), seq {cfg.data.seq_length}, micro batch {t.micro_batch_size} x accumulation "
              f"{t.gradient_accumulation_steps}, {t.train_iters} steps, log every {t.log_interval}; DeepSpeed: "
              f"ZeRO-{seen['stage']}, {dtype}, offload param/optimizer {seen['offload']}/"
              f"{seen['optimizer_offload']}, train_batch_size {ds.get('train_batch_size')}")
        return 0

    pretrain.run = summary
    rc = pretrain.main(argv)
    if rc != 0:
        print(f"invalid: pretrain.py's validation exited {rc}")
        return 1
    bad = [f"{k}={seen.get(k)} (expected {v})" for k, v in (e.split("=", 1) for e in expect.split(",") if e)
           if seen.get(k) != v]
    for b in bad:
        print(f"invalid: the run would not be what this check measures: {b}")
    return 1 if bad else 0


STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss (\S+) \| lr \S+ \| grad norm \S+ \| ([\d,.]+) tok/s \| "
                  r"([\d.]+) TFLOP/s/dev \| MFU ([\d.]+)% \|.*?mem ([\d.]+) GiB \| skipped (\d+)")


def _table_rows(text, first_cell):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def parse(kind, log, steps, gpu):
    """Markdown bullet lines of key figures; the last line is `TARGET <met|missed|n/a> <text>`."""
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    lines, target = [], ("n/a", "no target")
    if kind == "kernel_tests":
        res = re.findall(r"^(PASS|FAIL) ", text, re.M)
        lines.append(f"{res.count('PASS')} cases passed, {res.count('FAIL')} failed (fwd + every input gradient)")
        lines += [f"`{m}`" for m in re.findall(r"^FAIL .*$", text, re.M)[:10]]
        target = ("met" if res and "FAIL" not in res and "all passed" in text else "missed",
                  "every kernel within 2x the PyTorch reference's own error in its dtype (plus a floor) against "
                  "float64" + ("" if res else "; no case ran"))
    elif kind == "kernel_bench":
        target = ("missed", "no Triton LayerNorm / attention figures in the output")
        ln = _table_rows(text, "triton layer_norm")
        if ln:
            vals = [(r[1], float(r[4])) for r in ln]
            lines.append("Triton LayerNorm fwd+bwd vs copy bandwidth: " + ", ".join(f"{s} {v:.2f}" for s, v in vals))
            worst = min(v for _, v in vals)
            target = ("met" if worst >= 0.80 else "missed", f"LayerNorm >= 0.80 of copy BW (worst {worst:.2f})")
        cl = _table_rows(text, "cuda layer_norm")
        if cl:
            lines.append("CUDA LayerNorm fwd+bwd vs copy bandwidth: " + ", ".join(f"{r[1]} {r[4]}" for r in cl))
        fa = [r for r in _table_rows(text, "triton flash") if r[1] == "fwd+bwd"]
        want = [r for r in fa if 1024 <= int(r[2].split("x")[2]) <= 8192 and r[2].split("x")[3] in ("64", "128")]
        if want:
            lines.append("Triton attention fwd+bwd vs SDPA flash (BxHxTxD speedup, TFLOP/s): " + ", ".join(
                f"{r[2]} {r[5]}x ({r[4]})" for r in want))
            worst = min(float(r[5]) for r in want)
            ok = worst >= 1.0 and target[0] != "missed"
            target = ("met" if ok else "missed", (target[1] + "; " if ln else "") +
                      f"attention fwd+bwd >= 1.0x SDPA flash at T 1k-8k, D 64/128 (worst {worst:.2f}x)")
        if "cuda layer_norm unavailable" in text:
            lines.append("`" + re.search(r"# cuda layer_norm unavailable.*", text).group(0) + "`")
    elif kind == "preprocess":
        m = re.search(r"done: (\d+) docs, (\d+) tokens.*", text)
        if m:
            lines.append(f"`{m.group(0)}`")
    else:
        rows = [(int(a), int(b), float(c), float(d.replace(",", "")), float(e), float(f), float(g), int(h))
                for a, b, c, d, e, f, g, h in STEP.findall(text)]
        for pat in (r"model \S+: [\d,]+ params.*", r"MFU peak: .*", r"megagpt kernels: .*"):
            lines += [f"`{m}`" for m in dict.fromkeys(re.findall(pat, text))][:3]
        tried = re.findall(r"OVERFLOW!.*?[Aa]ttempted loss scale: (\d+)(?:, reducing to (\d+))?", text)
        if tried:   # DeepSpeed's dynamic loss scaler (rank 0, INFO)
            now = next((r for _, r in reversed(tried) if r), tried[-1][0])
            lines.append(f"fp16 loss scale: {len(tried)} overflow(s) skipped, scale {tried[0][0]} -> {now}")
        if not rows:
            return print("\n".join(f"- {x}" for x in lines) + "\nTARGET missed no step was logged") or 0
        last, first = rows[-1], rows[0]
        lines.append(f"last logged step {last[0]}/{last[1]}: loss {last[2]:.4f} (first logged {first[2]:.4f}), "
                     f"{last[3]:,.0f} tok/s, {last[4]:.1f} TFLOP/s, MFU {last[5]:.1f}%, mem {last[6]:.1f} GiB, "
                     f"skipped {last[7]}")
        done = last[0] == last[1]
        finite = all(math.isfinite(r[2]) for r in rows)
        if kind == "pretrain_bf16":
            h100 = re.search(r"H100|H200|H800|GH200", gpu or "")
            target = ("met" if done and last[5] >= 45.0 else "missed",
                      f"MFU {last[5]:.1f}% >= 45% on an H100-class GPU"
                      + ("" if h100 else f" (this GPU: {gpu or 'unknown'}, not H100-class: indicative only)"))
        elif kind == "pretrain_fp16":
            ok = done and finite and last[7] < last[1] // 2 and last[2] < first[2]
            target = ("met" if ok else "missed", "fp16 with dynamic loss scaling: every step to the end, finite "
                      "losses, under half the steps skipped for overflow, loss falling")
        else:
            stage3 = re.search(r"zero stage 3\b", text) is not None
            target = ("met" if done and finite and stage3 else "missed",
                      "ZeRO-3 with CPU offload (params + optimizer) runs every step with finite losses")
    print("\n".join(f"- {x}" for x in lines))
    print(f"TARGET {target[0]} {target[1]}")
    return 0


def main(argv):
    cmd = argv[0] if argv else "--help"
    if cmd in ("-h", "--help"):
        print("usage: suite_helper.py {versions | corpus OUT | kernel-check [--tiny] | flags -- CMD... | "
              "validate-pretrain EXPECT -- ARGS... | parse KIND LOG STEPS GPU}")
        return 0
    if cmd == "versions":
        return versions()
    if cmd == "corpus":
        return corpus(argv[1])
    if cmd == "kernel-check":
        return kernel_check("--tiny" in argv[1:])
    if cmd == "flags":
        return flags(argv[2:] if argv[1] == "--" else argv[1:])
    if cmd == "validate-pretrain":   # validate-pretrain EXPECT -- ARGS
        return validate_pretrain(argv[1], argv[3:])
    if cmd == "parse":   # parse KIND LOG STEPS GPU
        return parse(argv[1], argv[2], int(argv[3]), argv[4])
    raise SystemExit(f"unknown helper command {cmd}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
PYEOF

# ----------------------------------------------------------------------------------------------------------------
# Report header
GPU_NAME=""
if [[ $DRY -eq 0 ]]; then
    if ! command -v nvidia-smi >/dev/null || ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'
    then
        echo "gpu_suite.sh: no CUDA device here; on a CPU machine use --dry-run" >&2
        exit 2
    fi
fi
if command -v nvidia-smi >/dev/null; then
    SMI=$(nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || true)
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
else
    SMI="nvidia-smi: not found (no GPU on this machine)"
fi
VERSIONS=$("$PY" "$HELPER" versions 2>&1 | tail -1 || true)
{
    echo "# megagpt GPU suite"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Host: $(hostname), $(nproc) CPUs."
    echo "- Mode: $([[ $DRY -eq 1 ]] && echo 'dry-run (commands validated on CPU, nothing measured)' \
        || echo "GPU run, budget ${BUDGET} s")."
    echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null \
        || echo ' (working tree has uncommitted changes)')."
    echo "- Versions: $VERSIONS."
    echo "- Work dir (logs, data, configs): \`$WORK\`."
    echo
    echo '```'
    echo "$ nvidia-smi --query-gpu=name,memory.total --format=csv"
    echo "$SMI"
    echo '```'
} > "$OUT"

# ----------------------------------------------------------------------------------------------------------------
# Running one check
SUMMARY=()
FAILED=()
INVALID=()

quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# run_check ID TITLE LIMIT_S VALIDATOR -- COMMAND...: dry-run: print + validate; else run under timeout, report.
run_check() {
    local id=$1 title=$2 limit=$3 validator=$4; shift 5
    local cmd; cmd=$(quote "$@")
    local log=$LOGS/$id.log status wall="" rc=0 figures target="n/a" tline
    if [[ -n $ONLY && ",$ONLY," != *",$id,"* ]]; then
        return 0
    fi
    echo "[$id] \$ $cmd"
    if [[ $DRY -eq 1 ]]; then
        if "$validator" "$@" > "$log" 2>&1; then
            status="dry-run (command validated)"
        else
            status="INVALID"
            INVALID+=("$id")
            echo "[$id] INVALID command:" >&2
            grep -E '^(invalid|error)' "$log" | head -20 | sed "s/^/[$id]   /" >&2 || tail -20 "$log" >&2
        fi
        figures=$(grep -E '^(ok|invalid|error|kernel-check)' "$log" | head -12 | sed 's/^/- /' || true)
        target="dry-run"
    elif [[ -n ${SKIP_REASON:-} ]]; then
        status="skipped: $SKIP_REASON"
        FAILED+=("$id")
        figures=""
    else
        local left=$(( SUITE_START + BUDGET - $(date +%s) ))
        (( limit > left )) && limit=$left
        if (( limit < 15 )); then
            status="skipped: under 15 s of the suite's ${BUDGET} s budget left"
            FAILED+=("$id")
            figures=""
        else
            local t0; t0=$(date +%s%N)
            timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
            wall=$(( ($(date +%s%N) - t0) / 100000000 ))
            wall="$(( wall / 10 )).$(( wall % 10 ))"
            if [[ $rc -eq 0 ]]; then
                status="passed"
            elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
                status="FAILED: timed out after ${limit} s"
                FAILED+=("$id")
            else
                status="FAILED (exit $rc)"
                FAILED+=("$id")
            fi
            figures=$("$PY" "$HELPER" parse "$id" "$log" "$STEPS" "$GPU_NAME" 2>&1 || true)
            tline=$(grep '^TARGET ' <<< "$figures" | tail -1 || true)
            figures=$(grep -v '^TARGET ' <<< "$figures" || true)
            if [[ -n $tline ]]; then
                read -r _ target <<< "$tline"
                target=${target/#met /met: }
                target=${target/#missed /**missed**: }
                target=${target/#n\/a /n\/a: }
            fi
        fi
    fi
    echo "[$id] $status${wall:+ (${wall} s)}"
    SUMMARY+=("| $id | $status | ${wall:--} | ${target%%:*} |")
    {
        echo
        echo "## $title"
        echo
        echo "- Command (time limit ${limit} s): \`$cmd\`"
        echo "- Status: **$status**${wall:+, wall time ${wall} s}"
        echo "- Target: $target"
        echo "- Log: \`$log\`"
        [[ -n $figures ]] && echo "$figures"
        if [[ $DRY -eq 0 && $status != passed && -s $log ]]; then
            echo
            echo "Last lines of the log:"
            echo
            echo '```'
            tail -15 "$log" | cut -c1-300
            echo '```'
        fi
    } >> "$OUT"
}

# ----------------------------------------------------------------------------------------------------------------
# Validators (dry-run): each gets the exact command line; non-zero = invalid, with `invalid: ...` lines.
valid_flags() { "$PY" "$HELPER" flags -- "$@"; }

valid_kernel_tests() {
    valid_flags "$@" || return 1
    if "$PY" -c 'import triton' 2>/dev/null; then   # the same code, tiny sizes, in Triton's CPU interpreter
        env TRITON_INTERPRET=1 "$PY" "$HELPER" kernel-check --tiny || { echo "invalid: kernel-check failed"; return 1; }
    else
        echo "ok: triton is not installed here: the kernel check was not exercised"
    fi
}

valid_preprocess() {   # runs it for real: seconds on CPU, and the pretraining checks need its shards
    valid_flags "$@" || return 1
    "$@" || { echo "invalid: preprocessing failed"; return 1; }
}

valid_pretrain() {   # valid_pretrain EXPECT deepspeed ... pretrain.py ARGS
    local expect=$1; shift
    valid_flags "$@" || return 1
    local i=1
    while [[ $i -le $# && ${!i} != *pretrain.py ]]; do i=$((i + 1)); done
    [[ $i -le $# ]] || { echo "invalid: no pretrain.py in the command"; return 1; }
    "$PY" "$HELPER" validate-pretrain "$expect" -- "${@:$((i + 1))}"
}
valid_bf16() { valid_pretrain "dtype=bf16,stage=1,preset=gpt2-small,seq=1024" "$@"; }
valid_fp16() { valid_pretrain "dtype=fp16,stage=1,loss_scale=0,preset=gpt2-small,seq=1024" "$@"; }
valid_zero3() { valid_pretrain "stage=3,offload=cpu,optimizer_offload=cpu,preset=gpt2-small,seq=1024" "$@"; }

# ----------------------------------------------------------------------------------------------------------------
# The checks
GPU_ENV=(env -u TRITON_INTERPRET -u MEGAGPT_KERNELS)

run_check kernel_tests "Kernel tests, compiled on CUDA (no interpreter)" 120 valid_kernel_tests -- \
    "${GPU_ENV[@]}" "$PY" "$HELPER" kernel-check

run_check kernel_bench "Kernel benchmark (benchmarks/kernels.py)" 180 valid_flags -- \
    "${GPU_ENV[@]}" "$PY" benchmarks/kernels.py --reps 5

# data: tinyshakespeare + GPT-2 BPE from shared/ (in the checkout or beside it), else a generated corpus
SHARED=""
for d in "$REPO/shared/data" "$REPO/../shared/data"; do
    if [[ -f $d/corpus/tinyshakespeare.txt && -f $d/tokenizers/gpt2/encoder.json ]]; then
        SHARED=$(cd "$d" && pwd)
        break
    fi
done
if [[ -n $SHARED ]]; then
    CORPUS=$SHARED/corpus/tinyshakespeare.txt
    TOKENIZER=$SHARED/tokenizers/gpt2
else
    echo "[preprocess] no shared/data: generating a corpus and training a sentencepiece tokenizer on it"
    CORPUS=$WORK/data/generated.txt
    TOKENIZER=$WORK/data/generated.model
    if [[ ! -f $TOKENIZER ]] && ! { "$PY" "$HELPER" corpus "$CORPUS" && "$PY" tools/train_tokenizer.py \
            --input "$CORPUS" --vocab-size 4000 --output-prefix "${TOKENIZER%.model}" --force
        } > "$LOGS/corpus.log" 2>&1
    then
        echo "[preprocess] making the fallback corpus/tokenizer failed: see $LOGS/corpus.log" >&2
    fi
fi
PREFIX=$WORK/data/corpus
run_check preprocess "Data: preprocess the corpus ($(basename "$CORPUS"), tokenizer $(basename "$TOKENIZER"))" \
    60 valid_preprocess -- \
    "$PY" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$PREFIX" --tokenizer-model "$TOKENIZER" \
    --split-paragraphs --workers 4 --force
if [[ ! -f ${PREFIX}_text_document.bin ]]; then
    SKIP_REASON="no shards: preprocessing failed"
fi

# the pretraining config: gpt2-small at seq 1024, no dropout (the usual pretraining setting), no eval, no saves;
# batch sizes, steps, logging and the DeepSpeed config are flags of each command
CONFIG=$WORK/gpt2_small_suite.yaml
cat > "$CONFIG" <<EOF
# written by benchmarks/gpu_suite.sh
model:
  preset: gpt2-small
  embd_dropout: 0.0
  resid_dropout: 0.0
  attn_dropout: 0.0
data:
  data_path: [${PREFIX}_text_document]
  tokenizer: $TOKENIZER
  split: "1000,0,0"
  seq_length: 1024
  cache_dir: $WORK/cache
train:
  lr: 6.0e-4
  min_lr: 6.0e-5
  lr_warmup_iters: 10
  lr_decay_style: cosine
  weight_decay: 0.1
  adam_beta1: 0.9
  adam_beta2: 0.95
  clip_grad: 1.0
  eval_interval: 0
  save_interval: 0
  progress_bar: false
EOF
PRETRAIN=(deepspeed --num_gpus 1 megagpt/train/pretrain.py --config "$CONFIG")
FP16_STEPS=$(( STEPS * 2 / 5 ))
Z3_STEPS=$(( STEPS / 5 ))

run_check pretrain_bf16 "Pretraining: gpt2-small, bf16, ZeRO-1, $STEPS steps (MFU)" 200 valid_bf16 -- \
    "${GPU_ENV[@]}" "${PRETRAIN[@]}" --deepspeed_config ds_configs/zero1_bf16.json --micro-batch-size 16 \
    --gradient-accumulation-steps 2 --train-iters "$STEPS" --log-interval 10

run_check pretrain_fp16 "Pretraining: gpt2-small, fp16 with dynamic loss scaling, ZeRO-1, $FP16_STEPS steps" \
    100 valid_fp16 -- \
    "${GPU_ENV[@]}" "${PRETRAIN[@]}" --deepspeed_config ds_configs/zero1_fp16.json --micro-batch-size 16 \
    --gradient-accumulation-steps 1 --train-iters "$FP16_STEPS" --log-interval $(( FP16_STEPS / 4 ))

run_check pretrain_zero3_offload "Pretraining: gpt2-small, ZeRO-3 with CPU offload (fp32), $Z3_STEPS steps" \
    150 valid_zero3 -- \
    "${GPU_ENV[@]}" "${PRETRAIN[@]}" --deepspeed_config ds_configs/zero3_offload.json --micro-batch-size 8 \
    --gradient-accumulation-steps 1 --train-iters "$Z3_STEPS" --log-interval $(( Z3_STEPS / 2 ))

# ----------------------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - SUITE_START ))
{
    echo
    echo "## Summary"
    echo
    echo "| check | status | wall s | target |"
    echo "|---|---|---|---|"
    for row in "${SUMMARY[@]}"; do echo "$row"; done
    echo
    echo "Suite wall time: ${TOTAL} s."
} >> "$OUT"
echo "report: $OUT (${TOTAL} s)"
if [[ $DRY -eq 1 && ${#INVALID[@]} -gt 0 ]]; then
    echo "gpu_suite.sh --dry-run: invalid command line(s): ${INVALID[*]} (see $LOGS)" >&2
    exit 1
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_suite.sh: failed check(s): ${FAILED[*]}" >&2
    exit 1
fi
exit 0
