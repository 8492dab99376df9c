#!/usr/bin/env python
"""Check on your own hardware that resuming a run is bit-exact (and, optionally, that the layout
does not change the run): trains K steps straight, then the same run stopped at step J and
relaunched with the same command, and compares every logged loss and every tensor of the final
checkpoint (weights, fp32 masters, optimizer moments, step counters; every rank's files).

    python tools/verify_resume.py --config run.yaml --deepspeed_config ds_configs/zero2.json \\
        --launcher "deepspeed --num_gpus 2" --steps 20 --resume-at 10 [--serial-reference] \\
        [any other pretraining flag, e.g. --data-path ... --tensor-model-parallel-size 2]

Exit 0 when identical; 1 naming the first step or tensor that diverges. ``--serial-reference``
also runs the same config in one plain process at tensor_parallel = pipeline_parallel = 1 with the
same global batch (micro-batch 1, accumulated) and reports the largest loss gap (expected:
fp32 reduction-order noise, ~1e-6 on CPU; see docs/parallelism.md).
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402

PRETRAIN = Path(__file__).resolve().parents[1] / "megagpt" / "train" / "pretrain.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="the pretraining YAML/JSON")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON")
    p.add_argument("--launcher", default="deepspeed --num_gpus 1",
                   help="command prefix that starts the ranks (e.g. 'deepspeed --num_gpus 2', 'python')")
    p.add_argument("--steps", type=int, default=20, help="steps of the straight run")
    p.add_argument("--resume-at", type=int, default=10, help="the step the interrupted run stops at")
    p.add_argument("--work", default="verify_resume_out", help="directory for the runs (must not exist)")
    p.add_argument("--serial-reference", action="store_true", help="also compare against tp = pp = 1")
    a, extra = p.parse_known_args(argv)
    if not 0 < a.resume_at < a.steps:
        raise MegaGPTError(f"--resume-at {a.resume_at}: must be between 0 and --steps {a.steps}")
    if os.path.lexists(a.work):
        raise MegaGPTError(f"{a.work}: already exists; pass another --work directory")
    launcher = shlex.split(a.launcher)
    if not launcher or not shutil.which(launcher[0]):
        raise MegaGPTError(f"--launcher {a.launcher!r}: {launcher[0] if launcher else 'empty'}: command not found")
    return a, extra


def run(a, extra, save, *flags):
    cmd = [*shlex.split(a.launcher), str(PRETRAIN), "--config", a.config, "--deepspeed_config",
           a.deepspeed_config, "--train-iters", str(a.steps), "--save", str(save), "--no-progress-bar",
           "--log-interval", "1", "--save-interval", "0", *extra, *flags]
    print("$ " + shlex.join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = (r.stdout + r.stderr).strip().splitlines()
        said = [ln for ln in lines if ln.startswith("error: ")]   # pretraining's own one-line error, if it gave one
        raise MegaGPTError(f"run in {save} failed (exit {r.returncode}): "
                           + (said[0][len("error: "):] if said else " | ".join(lines[-5:])))
    lines = (Path(save) / "train_log.jsonl").read_text().splitlines()
    return {j["step"]: j["loss"] for j in map(json.loads, lines) if "loss" in j}, r.stdout


@cli_main
def main(argv=None) -> int:
    a, extra = parse_args(argv)
    from megagpt.checkpoint.compare import first_difference

    work = Path(a.work)
    straight, log = run(a, extra, work / "straight")
    run(a, extra, work / "resumed", "--exit-interval", str(a.resume_at))
    resumed, _ = run(a, extra, work / "resumed", "--load", str(work / "resumed"))
    bad = [s for s in sorted(straight) if resumed.get(s) != straight[s]]
    print(f"losses: {len(straight) - len(bad)} of {len(straight)} steps identical"
          + (f"; first divergence at step {bad[0]}: {straight[bad[0]]!r} vs {resumed.get(bad[0])!r}" if bad else ""))
    tag = f"global_step{a.steps}"
    diff, n = first_difference(work / "straight" / tag, work / "resumed" / tag)
    print(f"checkpoint {tag}: " + (f"identical ({n} tensors)" if diff is None else f"first difference: {diff}"))
    if a.serial_reference:
        gbs = re.search(r"global batch (\d+) x", log).group(1)   # the pretraining start line
        serial_run = argparse.Namespace(**{**vars(a), "launcher": sys.executable})
        serial, _ = run(serial_run, extra, work / "serial", "--tensor-model-parallel-size", "1",
                        "--pipeline-model-parallel-size", "1", "--no-sequence-parallel", "--micro-batch-size", "1",
                        "--gradient-accumulation-steps", gbs)
        gap = max(abs(serial[s] - straight[s]) for s in straight)
        print(f"this layout vs tp = pp = 1: max |loss gap| over {len(straight)} steps {gap:.3g}")
    exact = not bad and diff is None
    print("RESUME IS BIT-EXACT" if exact else "RESUME DIVERGES")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
