"""lm-evaluation-harness evaluation (megagpt/eval, tools/evaluate.py): our ``megagpt`` model gives
lm-eval's own ``hf`` backend's numbers on the same model exported to HF (every request's
log-likelihood, rolling log-likelihoods, greedy generations, accuracy), a TP=2 DeepSpeed checkpoint
the numbers of its consolidated form, the tasks read local files only, the CLI refuses bad input in
one line, and a real 2-rank pretraining run logs ``eval/<task>/<metric>`` equal to evaluating its
saved checkpoint afterwards."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from test_train_runs import REPO, launch, make_config, ok

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from megagpt.checkpoint.convert import convert  # noqa: E402
from megagpt.errors import MegaGPTError  # noqa: E402
from megagpt.eval import check_tasks, evaluate, scores, task_names  # noqa: E402
from megagpt.eval.harness import MegaGPTLM  # noqa: E402
from megagpt.eval.parity import per_request, random_checkpoint  # noqa: E402

LEGACY = REPO / "tests" / "fixtures" / "legacy_v0"
TOKENIZER = str(LEGACY / "tokenizer.model")          # sentencepiece, vocab 400, shipped in the repo
ALL_TASKS = ["copa_local", "storycloze_local", "sst2_local", "rte_local", "mrpc_local", "lambada_local"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOL = 1e-4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data):
    """A random Llama-style megagpt model (noise on every tensor; byte pieces never the argmax),
    consolidated and exported to HF."""
    d = tmp_path_factory.mktemp("evalmodel")
    cons = random_checkpoint("tiny-modern", d / "cons", TOKENIZER)
    return cons, convert(cons, d / "hf", "hf")


@pytest.fixture(scope="module")
def both(exported):
    from lm_eval.models.huggingface import HFLM

    cons, hf_dir = exported
    ours = MegaGPTLM(checkpoint=str(cons), batch_size=4)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32",
                  prefix_token_id=ours.prefix_token_id)
    assert theirs.max_length == ours.max_length == 64
    return ours, theirs


def test_every_task_matches_lm_evals_hf_backend(both, shared_data):
    """Every request's log-likelihood within 1e-4 of transformers' through lm-eval's own hf backend,
    the same greedy flags, the same accuracy (lambada's contexts are longer than max_seq_len=64:
    left truncation is exercised too)."""
    ours, theirs = both
    a = evaluate(ours, ALL_TASKS, limit=6, data_dir=shared_data, log_samples=True)
    b = evaluate(theirs, ALL_TASKS, limit=6, data_dir=shared_data, log_samples=True)
    ra, rb = per_request(a), per_request(b)
    assert ra.keys() == rb.keys() and len(ra) == 6 * (2 + 2 + 2 + 2 + 2 + 1)
    worst = max(abs(ra[k][0] - rb[k][0]) for k in ra)
    assert worst < TOL, worst
    assert all(ra[k][1] == rb[k][1] for k in ra)
    sa, sb = scores(a), scores(b)
    assert sa.keys() == set(ALL_TASKS)
    for task in ALL_TASKS:
        for metric in ("acc", "acc_norm") if task != "lambada_local" else ("acc",):
            assert sa[task][metric] == sb[task][metric], (task, metric)
    assert abs(sa["lambada_local"]["perplexity"] / sb["lambada_local"]["perplexity"] - 1) < 1e-3
    print(f"\nparity: {len(ra)} requests, worst |dll| {worst:.2e}; ours {sa}")


def test_rolling_loglikelihood_and_generation_match_hf_backend(both, shakespeare_txt):
    """Rolling windows (a text of ~5 windows of 64 tokens, and a short one) and greedy generation
    with ``until`` / ``max_gen_toks`` (batched: two contexts of equal token length)."""
    ours, theirs = both
    text = shakespeare_txt.read_text()[:1200]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "First Citizen:"])]
    la, lb = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert len(ours.tok_encode(text)) > 4 * ours.max_length
    assert all(abs(x - y) < TOL for x, y in zip(la, lb)), (la, lb)
    prompts = ["First Citizen:\nBefore we proceed", "Second Citizen:\nWe are", "ROMEO:\nO", text]

    def run(lm, settings):
        return lm.generate_until([Instance("generate_until", {}, (p, kw), i) for i, (p, kw) in enumerate(settings)])
    free = [(p, {"until": [], "max_gen_toks": n}) for p in prompts for n in (6, 16)]
    full = run(ours, free)
    assert full == run(theirs, free) and all(full[1::2])
    # max_gen_toks honoured (the long text's context is left-truncated to max_seq_len - max_gen_toks: not a prefix)
    assert all(b.startswith(a) and a != b for a, b in zip(full[0:6:2], full[1:6:2]))
    # stop strings taken from the middle of each free text: the output ends right before the first one
    stops = [(f[len(f) // 2: len(f) // 2 + 2], f[-3:]) for f in full[1::2]]
    cut = [(p, {"until": list(s), "max_gen_toks": 16}) for p, s in zip(prompts, stops)]
    got = run(ours, cut)
    assert got == run(theirs, cut)
    assert got == [f[:min(f.index(s) for s in stop)] for f, stop in zip(full[1::2], stops)]


def test_tp2_deepspeed_checkpoint_scores_like_its_consolidated_form(tmp_path, shared_data):
    cons = convert(LEGACY / "ckpt_tp2", tmp_path / "cons", "consolidated", tokenizer=TOKENIZER)
    tasks = ["sst2_local", "lambada_local"]   # max_seq_len=32: COPA's longest alternative does not fit
    a = evaluate(MegaGPTLM(checkpoint=str(LEGACY / "ckpt_tp2"), tokenizer=TOKENIZER), tasks, limit=8,
                 data_dir=shared_data, log_samples=True)
    b = evaluate(MegaGPTLM(checkpoint=str(cons)), tasks, limit=8, data_dir=shared_data, log_samples=True)
    ra, rb = per_request(a), per_request(b)
    assert ra.keys() == rb.keys() and all(abs(ra[k][0] - rb[k][0]) < 1e-5 for k in ra)
    sa, sb = scores(a), scores(b)
    assert sa.keys() == sb.keys() and all(sa[t] == pytest.approx(sb[t], rel=1e-5) for t in sa)


def test_bad_task_names_and_model_args_are_one_line_errors(exported, shared_data):
    assert task_names() == sorted(ALL_TASKS)
    assert check_tasks("copa_local, lambada_local") == ["copa_local", "lambada_local"]
    with pytest.raises(MegaGPTError, match="unknown task.*hellaswag.*available: copa_local"):
        check_tasks(["copa_local", "hellaswag"])
    with pytest.raises(MegaGPTError, match="nope: no such file or directory"):
        MegaGPTLM(checkpoint="nope")
    with pytest.raises(MegaGPTError, match="device='gpu': not a torch device"):
        MegaGPTLM(checkpoint=str(exported[0]), device="gpu")
    lm = MegaGPTLM(checkpoint=str(exported[0]))
    with pytest.raises(MegaGPTError, match="decodes greedily"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"do_sample": True}), 0)])
    with pytest.raises(MegaGPTError, match="max_gen_toks=64: must be in 1..63"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"max_gen_toks": 64}), 0)])
    with pytest.raises(MegaGPTError, match="evaluation data directory not found"):
        evaluate(lm, ["copa_local"], data_dir=shared_data / "missing")


def test_harness_leaves_the_global_rngs_alone(exported, shared_data):
    """lm-eval seeds python, numpy and torch; ``preserved_rng`` (used by the periodic evaluation
    during pretraining, where dropout and data order must not notice) puts every stream back."""
    import random

    import numpy as np

    from megagpt.eval import preserved_rng

    lm = MegaGPTLM(checkpoint=str(exported[0]))

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def run(preserve):
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        with preserved_rng() if preserve else contextlib.nullcontext():
            evaluate(lm, ["copa_local"], limit=2, data_dir=shared_data)
        return draws()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    fresh = draws()
    assert run(preserve=True) == fresh
    assert all(a != b for a, b in zip(run(preserve=False), fresh))   # what it guards against


def test_lambada_builder(tmp_path, shakespeare_txt, exported, shared_data):
    from megagpt.eval.lambada import lambada_docs, read_lambada, write_lambada

    docs = lambada_docs("A:\nsome words here and, " + "x " * 30 + "the end.\n\nB:\nglued to-day\n\n" + "w " * 30 + "9",
                        tail_fraction=1.0)
    assert docs == [{"context": "A:\nsome words here and, " + "x " * 30 + "the", "target": " end"}]
    n = write_lambada(shakespeare_txt, tmp_path / "l.jsonl")
    back = read_lambada(tmp_path / "l.jsonl")
    assert len(back) == n > 100 and back == lambada_docs(shakespeare_txt.read_text())
    text = shakespeare_txt.read_text()
    assert all(d["target"][1:].isalpha() and d["context"] + d["target"] in text for d in back)
    few = write_lambada(shakespeare_txt, tmp_path / "few.jsonl", tail_fraction=0.01)
    res = evaluate(MegaGPTLM(checkpoint=str(exported[0])), ["lambada_local"], data_dir=shared_data,
                   lambada_text=tmp_path / "few.jsonl")     # --lambada-text reaches the task
    assert 0 < few < n and res["n-samples"]["lambada_local"]["original"] == few
    (tmp_path / "bad.jsonl").write_text('{"context": "a"}\n')
    with pytest.raises(MegaGPTError, match=r"bad.jsonl:1: expected a JSON object"):
        read_lambada(tmp_path / "bad.jsonl")


def test_cli_bad_input_is_one_line(exported, shared_data, monkeypatch, capsys, tmp_path):
    """tools/evaluate.py's main (as the script runs it): exit 2 and one ``error:`` line, no traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setenv("MEGAGPT_EVAL_DATA", str(tmp_path / "not-there"))
    data = ["--data-dir", str(shared_data)]
    for args, msg in ((["/nonexistent/ckpt", "--tasks", "copa_local", *data], "/nonexistent/ckpt: no such file"),
                      ([str(exported[0]), "--tasks", "copa_local,hellaswag", *data], "unknown task(s) hellaswag"),
                      ([str(exported[0]), "--tasks", "copa_local", "--limit", "0", *data], "--limit 0: must be >= 1"),
                      ([str(exported[0]), "--tasks", "copa_local"], "evaluation data directory not found")):
        with pytest.raises(SystemExit) as e:
            tool.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_config_refuses_unknown_harness_task():
    from megagpt.config import TrainConfig

    assert TrainConfig.from_dict({"eval_harness_tasks": ["copa_local"]}).eval_harness_tasks == ["copa_local"]
    with pytest.raises(MegaGPTError, match="unknown task.*'copa'") as e:
        TrainConfig.from_dict({"eval_harness_tasks": ["copa"]})
    assert e.value.key == "eval_harness_tasks"


@pytest.mark.slow
def test_pretraining_logs_harness_scores_that_the_cli_reproduces(tmp_path, shakespeare_prefix, sp_model,
                                                                 shared_data):
    """2 gloo ranks at tensor_parallel=2, harness every 2 steps: the weights are gathered from both
    TP slices; the scores logged at the last step equal what tools/evaluate.py (offline: the hub
    switched off by HF_*_OFFLINE, the data dir by flag) computes from the saved TP=2 checkpoint."""
    tasks = ["copa_local", "lambada_local"]
    cfg = make_config(tmp_path / "c.yaml", shakespeare_prefix, sp_model,
                      train={"train_iters": 4, "save_interval": 0, "eval_interval": 0, "log_interval": 2,
                             "eval_harness_tasks": tasks, "eval_harness_interval": 2, "eval_harness_limit": 6,
                             "eval_harness_data_dir": str(shared_data)})
    r = ok(launch(cfg, "zero1.json", tmp_path / "ckpt", "--tensor-parallel", "2"))
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    harness = {row["step"]: row for row in rows if "eval/copa_local/acc" in row}
    assert sorted(harness) == [2, 4], rows
    assert "harness copa_local/acc" in r.stdout
    assert harness[2]["eval/lambada_local/perplexity"] != harness[4]["eval/lambada_local/perplexity"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ckpt" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/copa_local/acc")] == [2, 4]

    out = tmp_path / "r.json"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "MEGAGPT_EVAL_DATA": str(tmp_path / "not-there")}
    cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), str(tmp_path / "ckpt"), "--tasks", ",".join(tasks),
           "--limit", "6", "--batch-size", "5", "--data-dir", str(shared_data), "--output", str(out)]
    cli = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "|copa_local" in cli.stdout.replace(" ", "") and "\r" not in cli.stdout + cli.stderr
    res = json.loads(out.read_text())
    assert res["n-samples"]["copa_local"]["effective"] == 6
    flat = {f"eval/{t}/{m}": v for t, row in scores(res).items() for m, v in row.items()}
    logged = {k: v for k, v in harness[4].items() if k != "step"}
    assert logged.keys() == flat.keys()
    assert all(logged[k] == pytest.approx(flat[k], rel=1e-4) for k in flat), (logged, flat)
