"""Checkpoints written by the pre-redesign code (tests/fixtures/legacy_v0, see its make.py and
MANIFEST.json: serial ZeRO-2, TP=2 + sequence parallel ZeRO-1, PP=2 ZeRO-1, 2 ranks each, tag
global_step12) read by today's code reproduce what the old code computed from them.

Logits are compared to 2e-6 (about 10 fp32 ulps at their scale), not bit for bit: the same fp32
weights through the same fp32 operations give the same bits only on the same CPU kernels, and the
fixtures were made on an AMD EPYC (AVX-512) while an Intel Xeon with AMX takes other matmul paths
(differences there are ~1e-7). A changed op order, weight mapping or norm would move them by far
more; the greedy continuations must still match exactly. The fixtures' client state
names a tokenizer path on the machine that made them, so tests pass the fixture's tokenizer.model;
fixtures are copied to a temp dir first (never written in place)."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import load_model
from megagpt.model import generate
from megagpt.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_v0"
NAMES = ("serial", "tp2", "pp2")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    dest = tmp_path_factory.mktemp("legacy") / "legacy_v0"
    shutil.copytree(FIXTURES, dest)
    return dest


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "expected.pt", weights_only=False)


def _run(*args):
    """A tool as a user runs it: fresh process, umask 022."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.umask(0o022))


@pytest.mark.parametrize("name", NAMES)
def test_load_model_reproduces_the_old_logits_and_greedy_text(name, legacy, expected):
    model, tok, meta = load_model(legacy / f"ckpt_{name}", tokenizer=legacy / "tokenizer.model")
    assert (meta["format"], meta["tag"], meta["step"]) == ("deepspeed", "global_step12", 12)
    assert meta["run_config"]["model"]["name"] == "tiny" and tok.vocab_size == 400
    with torch.no_grad():
        logits = model(expected["ids"])
    torch.testing.assert_close(logits, expected["logits"][name], atol=2e-6, rtol=0)
    ids = expected["ids"][0].tolist()
    assert generate(model, ids, 10, temperature=0.0).tolist() == expected["greedy"][name]


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_generate_cli_prints_the_old_greedy_continuation(name, legacy, expected):
    ids = expected["ids"][0].tolist()
    r = _run("tools/generate.py", legacy / f"ckpt_{name}", "--prompt-ids", ",".join(map(str, ids)),
             "--temperature", "0", "--max-new-tokens", "10", "--tokenizer", legacy / "tokenizer.model")
    assert r.returncode == 0, r.stderr[-2000:]
    text = load_tokenizer(legacy / "tokenizer.model").decode(expected["greedy"][name])
    assert r.stdout == f"=== [global_step12] prompt 1: {ids!r}\n{text}\n"


def test_generate_cli_names_the_missing_tokenizer_in_one_line(legacy, tmp_path):
    """The client state of an older checkpoint names the user's tokenizer file; once it is gone the
    tool says so and how to go on (it would pass on the machine that made the fixtures: point the
    copy's client state at a path that surely does not exist)."""
    ckpt = tmp_path / "ckpt_tp2"
    shutil.copytree(legacy / "ckpt_tp2", ckpt)
    states = ckpt / "global_step12" / "mp_rank_00_model_states.pt"
    client = torch.load(states, weights_only=False)
    client["tokenizer"]["path"] = str(tmp_path / "gone" / "tok.model")
    torch.save(client, states)
    r = _run("tools/generate.py", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "3")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'gone' / 'tok.model'} no longer exists" in r.stderr and "--tokenizer PATH" in r.stderr


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_convert_to_hf_runs_the_same_model_in_transformers(name, legacy, expected, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    r = _run("tools/convert_checkpoint.py", "--input", legacy / f"ckpt_{name}", "--to", "hf", "--output", out,
             "--tokenizer", legacy / "tokenizer.model", "--quiet")
    assert r.returncode == 0 and r.stdout == f"wrote {out}\n" and r.stderr == "", r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"]                       # no temp dirs left beside it
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(legacy / f"ckpt_{name}", tokenizer=legacy / "tokenizer.model").model
    x = torch.cat([expected["ids"], torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        theirs = hf(x).logits
        assert (ours(x) - theirs).abs().max().item() <= 1e-5
    assert (theirs[:1] - expected["logits"][name]).abs().max().item() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)("hear me")["input_ids"]


def test_convert_quiet_is_quiet_and_the_log_names_real_paths(legacy, expected, tmp_path):
    """ZeRO-2 goes through DeepSpeed's zero_to_fp32, which prints progress of its own: --quiet hides
    it; otherwise it is part of the log, which names the input tag and the published output."""
    src, tok = legacy / "ckpt_serial", legacy / "tokenizer.model"
    quiet = _run("tools/convert_checkpoint.py", "--input", src, "--to", "hf", "--output", tmp_path / "q",
                 "--tokenizer", tok, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == f"wrote {tmp_path / 'q'}\n" and quiet.stderr == "", quiet
    loud = _run("tools/convert_checkpoint.py", "--input", src, "--to", "consolidated", "--output", tmp_path / "c",
                "--tokenizer", tok)
    assert loud.returncode == 0, loud.stderr
    assert "Processing zero checkpoint" in loud.stderr
    assert f"converted {src / 'global_step12'} (deepspeed, model tiny, step 12) to {tmp_path / 'c'}" in loud.stderr
    assert sorted(os.listdir(tmp_path)) == ["c", "q"]
    model, tok2, meta = load_model(tmp_path / "c")   # the tokenizer now travels with the weights
    assert meta["step"] == 12 and tok2.vocab_size == 400
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"]), expected["logits"]["serial"], atol=2e-6, rtol=0)
