"""End to end: all four GPT-1 task types finetune under the real `deepspeed` launcher (2 gloo ranks)
from random, consolidated and DeepSpeed-ZeRO pretrained inits, evaluate, and write a best checkpoint.

One launch runs everything (this file is also the worker script: ``--worker``) to keep CI time low.
"""
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # real multi-process runs; `-m "not slow"` skips them locally

REPO = Path(__file__).resolve().parents[1]
TASK_RUNS = {   # task -> init kind
    "sst2": "random", "rte": "consolidated", "stsb": "deepspeed", "copa": "random",
}
EVAL_LIMIT = 40


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path, tok_path: str, data_root: str):
    """Runs on every rank: make both pretrained checkpoint kinds, then finetune each task via run.main."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from megagpt.checkpoint import load_model
    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.finetune import run
    from megagpt.finetune.loop import init_distributed
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    init_distributed()
    rank = dist.get_rank()
    tok = load_tokenizer(tok_path)
    torch.manual_seed(7)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    gpt = GPT(cfg)
    engine, *_ = deepspeed.initialize(
        model=gpt, optimizer=torch.optim.AdamW(gpt.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    engine.save_checkpoint(str(out / "pre_ds"), tag="global_step5",
                           client_state={"config": {"model": cfg.to_dict()}, "tokenizer": tok.spec()})
    dist.barrier()
    ref = {k: v.clone() for k, v in gpt.state_dict().items()}
    if rank == 0:
        save_consolidated(out / "pre_cons", ref, cfg.to_dict(), tokenizer_path=tok_path)
        for kind in ("pre_ds", "pre_cons"):   # both loaders give back exactly the saved weights
            model, loaded_tok, meta = load_model(out / kind)
            got = model.state_dict()
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), kind
            assert meta["tokenizer_path"] is not None and loaded_tok.vocab_size == tok.vocab_size
    dist.barrier()
    inits = {"random": "random", "consolidated": str(out / "pre_cons"), "deepspeed": str(out / "pre_ds")}
    for task, init in TASK_RUNS.items():
        run.main(["--task", task, "--data-root", data_root, "--init", inits[init], "--tokenizer", tok_path,
                  "--train-limit", "64", "--eval-limit", str(EVAL_LIMIT), "--epochs", "1",
                  "--batch-size", "16", "--lr", "1e-4", "--save", str(out / task), "--log-interval", "2"])


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, sp_model, shared_data):
    out = tmp_path_factory.mktemp("finetune_e2e")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(Path(__file__).resolve()),
           "--worker", str(out), sp_model, str(shared_data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, log


def test_all_task_types_under_deepspeed_launcher(e2e_run):
    out, log = e2e_run
    assert "dp=2 tp=1" in log and log.count("lm_coef 0.5") == len(TASK_RUNS)
    # every logged step has the auxiliary LM term, and loss = L2 + λ·L1 with λ = 0.5 (4-decimal logs)
    steps = re.findall(r"step \d+/\d+ loss (\S+) task (\S+)( lm (\S+))? lr", log)
    assert len(steps) == 2 * len(TASK_RUNS), steps     # 4 steps per task, --log-interval 2
    for loss, task_loss, has_lm, lm in steps:
        assert has_lm, steps
        assert abs(float(loss) - (float(task_loss) + 0.5 * float(lm))) <= 2e-4, steps
    for task in TASK_RUNS:
        hist = json.loads((out / task / "history.json").read_text())
        (res,) = hist["history"]
        assert math.isfinite(res["train_loss"]) and math.isfinite(res["eval_loss"]), res
        assert res["eval_examples"] == EVAL_LIMIT          # both ranks' slices gathered, none twice
        if task == "stsb":
            assert -1 <= res["pearson"] <= 1 and -1 <= res["spearman"] <= 1
        else:
            assert 0 <= res["accuracy"] <= 1
        info = json.loads((out / task / "best" / "finetune.json").read_text())
        assert info["task"] == task and info["epoch"] == 1 and (out / task / "best" / "model.safetensors").is_file()
        assert not list((out / task).glob(".best*"))       # no temp dirs left behind


@pytest.mark.parametrize("task_name", list(TASK_RUNS))
def test_best_checkpoint_reproduces_its_logged_metrics(e2e_run, shared_data, task_name):
    """Reload each task's best/ in this process and evaluate its 40 eval examples: the logged
    eval loss, accuracy / Pearson / Spearman (recomputed here with numpy and scipy, not
    megagpt.finetune.metrics) equal what the 2-rank run logged from its gathered predictions."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from megagpt.finetune.checkpoint import load_finetuned
    from megagpt.finetune.heads import FinetuneModel
    from megagpt.finetune.loop import collate, encode_examples
    from megagpt.finetune.tasks import get_task
    from megagpt.finetune.transforms import SpecialIds
    from megagpt.model import GPT, ModelConfig
    from megagpt.tokenizer import load_tokenizer

    out, _ = e2e_run
    sd, info = load_finetuned(out / task_name / "best")
    task = get_task(task_name)
    model = FinetuneModel(GPT(ModelConfig.from_dict(info["model"])), task.kind, task.num_outputs, task.regression)
    model.load_state_dict(sd)
    model.eval()
    tok = load_tokenizer(out / task_name / "best" / "tokenizer" / "tokenizer.model")
    _, ev = task.load(shared_data)
    data = encode_examples(task, ev[:EVAL_LIMIT], tok, info["model"]["max_seq_len"])
    sp = SpecialIds.from_tokenizer(tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the ranks ran (OMP_NUM_THREADS=1)
    outs, losses = [], []
    try:   # the run's batches: each rank a contiguous half, micro-batches of 16 / 2 ranks = 8
        for lo, hi in ((0, EVAL_LIMIT // 2), (EVAL_LIMIT // 2, EVAL_LIMIT)):
            for i in range(lo, hi, 8):
                ids, cls_pos, _, y = collate(data[i:min(i + 8, hi)], sp.pad, sp.cls, task.regression)
                with torch.no_grad():
                    _, o, parts = model(ids, cls_pos, None, y, batch_size=y.size(0))
                outs.append(o.float())
                losses.append(parts["task"].item() * y.size(0))
    finally:
        torch.set_num_threads(threads)
    got, labels = torch.cat(outs).numpy(), np.array([y for _, y in data])
    logged = info["metrics"]
    assert logged["eval_examples"] == EVAL_LIMIT
    assert sum(losses) / EVAL_LIMIT == pytest.approx(logged["eval_loss"], rel=1e-5)
    if task.regression:
        assert np.corrcoef(got, labels)[0, 1] == pytest.approx(logged["pearson"], abs=1e-5)
        assert spearmanr(got, labels)[0] == pytest.approx(logged["spearman"], abs=1e-5)
    else:
        assert (got.argmax(-1) == labels).mean() == pytest.approx(logged["accuracy"], abs=1e-9)


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Config mistakes fail before any process group starts: one `error:` line, exit 2."""
    from megagpt.finetune import run

    for argv, msg in ((["--task", "sst2", "--init", "random"], "error: --tokenizer, key 'finetune.tokenizer': missing"),
                      (["--task", "rte", "--init", str(tmp_path / "nope")], "no such checkpoint directory"),
                      (["--task", "rte", "--init", "random", "--tokenizer", "t", "--data-root", str(tmp_path / "x")],
                       "--data-root")):
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err


def test_plain_python_process_mrpc(tmp_path, sp_model, shared_data):
    """The entry as one plain `python` process (no launcher): MRPC similarity, 2 epochs, F1 logged."""
    r = subprocess.run([sys.executable, "megagpt/finetune/run.py", "--task", "mrpc", "--init", "random",
                        "--tokenizer", sp_model, "--data-root", str(shared_data), "--train-limit", "32",
                        "--eval-limit", "24", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
                        "--save", str(tmp_path / "mrpc")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = [json.loads(line.split("eval ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("eval {")]
    assert [e["epoch"] for e in evals] == [1, 2] and "dp=1 tp=1" in r.stdout
    assert all(0 <= e["f1"] <= 1 and 0 <= e["accuracy"] <= 1 and e["eval_examples"] == 24 for e in evals)
    hist = json.loads((tmp_path / "mrpc" / "history.json").read_text())
    best = max(evals, key=lambda e: e["f1"])           # first epoch wins ties
    assert hist["best"]["epoch"] == best["epoch"]
    info = json.loads((tmp_path / "mrpc" / "best" / "finetune.json").read_text())
    assert info["epoch"] == best["epoch"] and info["main_metric"] == "f1"


SWEEP = """
import json, os, sys
from megagpt.config import FinetuneConfig
from megagpt.finetune.loop import finetune
out = []
for lr in (1e-3, 1e-3, 3e-3):
    cfg = FinetuneConfig(task="sst2", data_root=sys.argv[1], init="random", preset="tiny", tokenizer=sys.argv[2],
                         batch_size=4, epochs=1, seed=0, train_limit=16, eval_limit=8, log_interval=0, lr=lr)
    h = finetune(cfg, log=lambda m: None)["history"]
    out.append({"threads": len(os.listdir("/proc/self/task")), "history": [{k: v for k, v in e.items()
                if k != "epoch_time_s"} for e in h]})
print("SWEEP " + json.dumps(out))
"""


def test_finetune_called_in_a_loop_reuses_its_process_groups(sp_model, shared_data):
    """A sweep in one plain process: finetune() three times. Each call used to add a layout's gloo
    groups (12 OS threads) for good; the same layout now gets the same groups back, and a repeated
    config gives the same history (nothing left over from the call before changes the next)."""
    r = subprocess.run([sys.executable, "-c", SWEEP, str(shared_data), sp_model], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = json.loads(r.stdout.split("SWEEP ", 1)[1])
    assert [x["threads"] for x in runs] == [runs[0]["threads"]] * 3, [x["threads"] for x in runs]
    assert runs[0]["history"] == runs[1]["history"] and runs[2]["history"] != runs[0]["history"]


if __name__ == "__main__" and "--worker" in sys.argv:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    i = args.index("--worker")
    worker(Path(args[i + 1]), args[i + 2], args[i + 3])
