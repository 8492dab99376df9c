"""benchmarks/gpu_suite.sh --dry-run on CPU: every command line it would run on a GPU is valid (files exist, flags
are in each entry point's --help, pretrain.py accepts the written config), the report skeleton has every section,
and a planted bug (a misspelled flag, a missing DeepSpeed config, a config with the wrong ZeRO stage) makes the
dry-run fail naming that check. The dry-run takes ~20 s on 2 cores, hence `slow`."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
CHECKS = ["kernel_tests", "kernel_bench", "preprocess", "pretrain_bf16", "pretrain_fp16", "pretrain_zero3_offload"]
SECTIONS = ["## Kernel tests, compiled on CUDA (no interpreter)", "## Kernel benchmark (benchmarks/kernels.py)",
            "## Data: preprocess the corpus", "## Pretraining: gpt2-small, bf16, ZeRO-1, 50 steps (MFU)",
            "## Pretraining: gpt2-small, fp16 with dynamic loss scaling", "## Pretraining: gpt2-small, ZeRO-3 with CPU "
            "offload", "## Summary"]
OUTPUT_FLAGS = {"--output-prefix"}


def _suite(tmp_path, *args, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_SUITE_REPO": str(REPO)}
    return subprocess.run(["bash", str(script or SUITE), "--dry-run", "--out", str(tmp_path / "report.md"),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _commands(stdout):
    """{check id: argv} from the `[id] $ command` lines the suite prints."""
    return {m.group(1): shlex.split(m.group(2)) for m in re.finditer(r"^\[(\w+)\] \$ (.*)$", stdout, re.M)}


@lru_cache(maxsize=None)
def _help(*cmd):
    res = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
    return res.stdout


def _problems(argv):
    """What is wrong with one command line: a referenced file that does not exist, a flag its --help lacks."""
    while argv[0] == "env" or argv[0] == "-u" or (argv[0].isupper() and "=" not in argv[0]) or "=" in argv[0]:
        argv = argv[1:]   # env -u VAR -u VAR ... COMMAND
    if argv[0] == "deepspeed":
        j = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        parts = [(("deepspeed", "--help"), argv[1:j]), ((sys.executable, argv[j], "--help"), argv[j + 1:])]
        script = argv[j]
    else:
        assert os.path.basename(argv[0]).startswith("python"), argv
        parts, script = [((sys.executable, argv[1], "--help"), argv[2:])], argv[1]
    if not (REPO / script).is_file():
        return [f"{script} does not exist"]
    bad = []
    for help_cmd, args in parts:
        text = _help(*help_cmd)
        for prev, a in zip([None] + args, args):
            if a.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(a.split('=')[0])}(?![\w-])", text):
                bad.append(f"{help_cmd[-2]}: no flag {a}")
            elif "/" in a and prev not in OUTPUT_FLAGS and not (REPO / a).exists():
                bad.append(f"{a} does not exist")
    return bad


@pytest.mark.slow
def test_dry_run_validates_every_command_and_writes_the_report(tmp_path):
    res = _suite(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for header in ["# megagpt GPU suite", "$ nvidia-smi --query-gpu=name,memory.total --format=csv",
                   "- Versions: python ", "torch ", "triton ", "deepspeed ", *SECTIONS]:
        assert header in report, f"{header!r} missing from the report:\n{report}"
    assert report.count("**dry-run (command validated)**") == len(CHECKS), report
    for check in CHECKS:
        assert re.search(rf"^\| {check} \| dry-run \(command validated\) \| - \| dry-run \|$", report, re.M), check

    cmds = _commands(res.stdout)
    assert sorted(cmds) == sorted(CHECKS), res.stdout
    for check, argv in cmds.items():
        assert _problems(argv) == [], f"{check}: {shlex.join(argv)}"
        assert f"`{shlex.join(argv)}`" in report or check in report

    # what each command would run on the GPU is what the issue asks for
    assert "TRITON_INTERPRET" in cmds["kernel_tests"][:3] and cmds["kernel_tests"][-1] == "kernel-check"
    assert "benchmarks/kernels.py" in cmds["kernel_bench"]
    ds = {}
    for check in ("pretrain_bf16", "pretrain_fp16", "pretrain_zero3_offload"):
        argv = cmds[check]
        assert argv[argv.index("deepspeed"):argv.index("deepspeed") + 4] == [
            "deepspeed", "--num_gpus", "1", "megagpt/train/pretrain.py"], argv
        ds[check] = json.loads((REPO / argv[argv.index("--deepspeed_config") + 1]).read_text())
        cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
        assert cfg["model"]["preset"] == "gpt2-small" and cfg["data"]["seq_length"] == 1024
    assert cmds["pretrain_bf16"][cmds["pretrain_bf16"].index("--train-iters") + 1] == "50"
    assert ds["pretrain_bf16"]["bf16"]["enabled"] and ds["pretrain_bf16"]["zero_optimization"]["stage"] == 1
    assert ds["pretrain_fp16"]["fp16"]["enabled"] and ds["pretrain_fp16"]["fp16"]["loss_scale"] == 0   # dynamic
    z3 = ds["pretrain_zero3_offload"]["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_param"]["device"] == z3["offload_optimizer"]["device"] == "cpu"
    # pretrain.py's own validation ran on each (config + DeepSpeed JSON), and the kernel check in the interpreter
    assert "ok: pretrain.py accepts the command: model gpt2-small" in report
    assert re.search(r"kernel-check: 0 failed, all passed|triton is not installed here", report)


@pytest.mark.slow
def test_dry_run_fails_on_a_planted_bug_naming_the_check(tmp_path):
    text = SUITE.read_text()
    bad_flag = "--gradient-acumulation-steps"
    assert text.count("--gradient-accumulation-steps 1 --train-iters \"$FP16_STEPS\"") == 1
    text = text.replace("--gradient-accumulation-steps 1 --train-iters \"$FP16_STEPS\"",
                        f"{bad_flag} 1 --train-iters \"$FP16_STEPS\"")
    assert text.count("ds_configs/zero3_offload.json") == 1
    text = text.replace("ds_configs/zero3_offload.json", "ds_configs/zero3_ofload.json")
    assert text.count("ds_configs/zero1_bf16.json") == 1   # exists and is valid, but is not ZeRO-1
    text = text.replace("ds_configs/zero1_bf16.json", "ds_configs/zero2_bf16.json")
    planted = tmp_path / "gpu_suite.sh"
    planted.write_text(text)
    res = _suite(tmp_path, "--only", "pretrain_bf16,pretrain_fp16,pretrain_zero3_offload", script=planted)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "invalid command line(s): pretrain_bf16 pretrain_fp16 pretrain_zero3_offload" in res.stderr, res.stderr
    assert bad_flag in res.stderr and "zero3_ofload.json does not exist" in res.stderr, res.stderr
    assert "stage=2 (expected 1)" in res.stderr, res.stderr
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"^\| preprocess \| dry-run \(command validated\)", report, re.M), report
    assert re.search(r"^\| pretrain_fp16 \| INVALID", report, re.M), report
    # and this file's own command check (used on the real suite above) catches both as well
    cmds = _commands(res.stdout)
    assert any(bad_flag in p for p in _problems(cmds["pretrain_fp16"]))
    assert any("zero3_ofload.json does not exist" in p for p in _problems(cmds["pretrain_zero3_offload"]))


def test_bad_arguments_and_no_gpu_without_dry_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, msg in ((["--steps", "55"], "--steps must be a positive multiple of 10"),
                      (["--only", "pretrain"], "--only pretrain: not one of"), (["--bogus"], "unknown argument")):
        res = subprocess.run(["bash", str(SUITE), "--dry-run", *args], env=env, capture_output=True, text=True)
        assert res.returncode == 2 and msg in res.stderr, res.stderr
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the no-GPU refusal is not checked here")
    res = subprocess.run(["bash", str(SUITE), "--out", str(tmp_path / "r.md"), "--workdir", str(tmp_path / "w")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device here; on a CPU machine use --dry-run" in res.stderr
    assert not (tmp_path / "r.md").exists()
