"""Continued pretraining from released weights (``train.init_from`` / ``--init-from``): an HF GPT-2
directory written by ``transformers`` itself loads into megagpt with the same logits, refuses a
model that does not fit (naming the first tensor or field), starts a real run at step 0 with its
first loss equal to transformers' loss on the same samples (tensor-parallel layout), and yields to
a checkpoint in --load (the resume rule).
"""
import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from megagpt.config import load_config
from megagpt.model import GPT
from megagpt.train import pretrain
from test_train_runs import ENV, REPO, free_port

MODEL = {"preset": "tiny-gpt2", "max_seq_len": 64}


def write_config(path, prefix, tok, train=None, parallel=None, debug=None):
    cfg = {"model": MODEL, "data": {"data_path": [prefix], "tokenizer": tok, "split": "949,50,1", "seq_length": 64},
           "train": {"micro_batch_size": 4, "train_iters": 4, "lr": 3e-3, "log_interval": 1, "eval_interval": 0,
                     "progress_bar": False, **(train or {})},
           "parallel": parallel or {}, "debug": debug or {}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def hf_gpt2(out, mcfg, seed=0, **changes):
    """A GPT2LMHeadModel matching megagpt ModelConfig ``mcfg`` (plus ``changes``), every weight random
    (norm scales and biases too, so a swapped or dropped tensor shows), saved by save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=mcfg.vocab_size, n_positions=mcfg.max_seq_len, n_embd=mcfg.n_embd, n_layer=mcfg.n_layer,
              n_head=mcfg.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, layer_norm_epsilon=mcfg.norm_eps, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**kw, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                    or name.endswith("ln_f.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def launch_ranks(n, args, logs, timeout=300) -> str:
    """``n`` pretrain ranks started directly with the env a launcher sets (RANK, WORLD_SIZE, MASTER_*):
    what torchrun does, without the launcher's own start-up (seconds on 2 busy cores). Every rank is
    waited for, or killed by its pid, before returning; returns rank 0's stdout."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = []
    try:
        for rank in range(n):
            with open(logs / f"rank{rank}.out", "w") as o, open(logs / f"rank{rank}.err", "w") as e:
                procs.append(subprocess.Popen([sys.executable, "-m", "megagpt.train.pretrain", *args], cwd=REPO,
                                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                              stdout=o, stderr=e))
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = {f.name: f.read_text() for f in logs.iterdir()}
    assert all(p.returncode == 0 for p in procs), {k: v[-2000:] for k, v in text.items()}
    return text["rank0.out"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shakespeare_prefix, sp_model):
    d = tmp_path_factory.mktemp("init_from")
    cfg_path = write_config(d / "c.yaml", shakespeare_prefix, sp_model)
    mcfg = load_config(cfg_path).model
    hf = hf_gpt2(d / "hf", mcfg)
    return d, cfg_path, mcfg, hf


@pytest.mark.parametrize("fmt", ["hf", "consolidated"])
def test_weights_give_transformers_logits(setup, fmt):
    """Straight from the HF dir, and from the consolidated megagpt checkpoint ``convert`` makes of it."""
    d, cfg_path, mcfg, hf = setup
    path = d / "hf"
    if fmt == "consolidated":
        from megagpt.checkpoint.convert import convert
        path = convert(d / "hf", d / "consolidated", to="consolidated", force=True)
    cfg = load_config(cfg_path, {("train", "init_from"): str(path)})
    src = pretrain.check_init_from(cfg)
    assert src.format == fmt
    model = GPT(cfg.model).eval()
    pretrain.init_weights(model, src)
    ids = torch.randint(0, mcfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


def refusal(capsys, cfg_path, *flags):
    capsys.readouterr()   # (save_pretrained's progress bars)
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--config", str(cfg_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_mismatching_model_refused_naming_the_first_difference(setup, capsys):
    d, cfg_path, mcfg, _ = setup
    hf_gpt2(d / "wide", mcfg, n_embd=2 * mcfg.n_embd)
    line = refusal(capsys, cfg_path, "--init-from", str(d / "wide"))
    assert line.startswith("error: ") and "--init-from" in line and "train.init_from" in line
    assert f"tensor embed.tok.weight: checkpoint ({mcfg.padded_vocab_size}, {2 * mcfg.n_embd}) != config " \
           f"({mcfg.padded_vocab_size}, {mcfg.n_embd})" in line, line
    hf_gpt2(d / "heads", mcfg, n_head=2 * mcfg.n_head)   # every shape fits; the attention does not
    line = refusal(capsys, cfg_path, "--init-from", str(d / "heads"))
    assert f"model.n_head: checkpoint {2 * mcfg.n_head} != config {mcfg.n_head}" in line, line
    line = refusal(capsys, cfg_path, "--init-from", str(d / "nothing-here"))
    assert "nothing-here: no such file or directory" in line, line


@pytest.mark.slow
def test_tensor_parallel_run_starts_from_the_weights_at_step_0(setup, shakespeare_prefix, sp_model):
    """2 ranks, tensor_parallel=2 (ZeRO-0): step 1's loss is transformers' loss on samples 0..3 (data position 0),
    and training goes on from there. Then the resume rule: with a checkpoint in --load, init_from is not read."""
    d, _, mcfg, hf = setup
    save = d / "tp2"
    cfg_path = write_config(d / "tp2.yaml", shakespeare_prefix, sp_model, parallel={"tensor_parallel": 2},
                            debug={"sample_ids": True})
    t0 = time.time()
    out = launch_ranks(2, ["--config", str(cfg_path), "--deepspeed_config", str(REPO / "ds_configs/zero0.json"),
                           "--save", str(save), "--load", str(save), "--init-from", str(d / "hf")], d / "tp2_logs")
    print(f"tp=2 init-from run: {time.time() - t0:.1f} s")
    assert f"initialised the weights from {d / 'hf'} (hf): step 0, fresh optimizer" in out
    log = [json.loads(ln) for ln in (save / "train_log.jsonl").read_text().splitlines()]
    loss = {rec["step"]: rec["loss"] for rec in log if "loss" in rec}
    assert sorted(loss) == [1, 2, 3, 4]
    first = [json.loads(ln) for ln in (save / "samples_rank0.jsonl").read_text().splitlines()][0]
    assert first["step"] == 1 and first["ids"] == [0, 1, 2, 3]   # data position 0

    from megagpt.data import build_gpt_datasets
    cfg = load_config(cfg_path)
    train_ds = build_gpt_datasets(cfg.data, (4 * 4, 0, 0), cfg.model.vocab_size)[0]
    tokens = torch.stack([torch.as_tensor(train_ds[i]["tokens"], dtype=torch.long) for i in range(4)])
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert abs(loss[1] - ref) < 1e-5, (loss[1], ref)
    assert loss[4] < loss[1] - 0.05   # and it trains from there

    # the resume rule, on the checkpoint that run saved: the run's own state wins over init_from
    cfg = load_config(cfg_path, {("train", "init_from"): str(d / "hf"), ("train", "load"): str(save)})
    assert pretrain.check_init_from(cfg) is None
    bad = load_config(cfg_path, {("train", "init_from"): str(d / "nothing"), ("train", "load"): str(save)})
    assert pretrain.check_init_from(bad) is None   # not even opened
