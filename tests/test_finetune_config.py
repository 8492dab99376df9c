"""Finetuning's config and the pieces it shares with pretraining: flags generated from
``FinetuneConfig`` (pretraining's names for the same settings), errors that name the flag or the
file line, the one parameter-group rule, the one LR formula, the one DeepSpeed-config builder.
All in-process and fast (no process group)."""
import math
from pathlib import Path

import pytest
import torch

from megagpt.config import load_finetune_config
from megagpt.errors import MegaGPTError
from megagpt.finetune import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tmp_path):
    """Flags that make a valid random-init config (the tokenizer is only checked for being given)."""
    (tmp_path / "data").mkdir()
    return ["--task", "rte", "--init", "random", "--tokenizer", str(tmp_path / "tok.model"),
            "--data-root", str(tmp_path / "data")]


def config(argv):
    a, overrides = run.parse_args(argv)
    return load_finetune_config(a.config, overrides)


def test_flags_have_pretraining_names(base, tmp_path):
    cfg = config(base + ["--seq-length", "48", "--deepspeed_config", "x.json", "--save", str(tmp_path / "out"),
                         "--log-interval", "5", "--clip-grad", "0.5", "--weight-decay", "0.1", "--lr", "1e-4",
                         "--zero-stage", "2", "--skip-bad", "--model-override", "n_layer=3"])
    assert (cfg.seq_length, cfg.deepspeed_config, cfg.save, cfg.log_interval) == (48, "x.json", str(tmp_path / "out"), 5)
    assert (cfg.clip_grad, cfg.weight_decay, cfg.lr, cfg.zero_stage, cfg.skip_bad) == (0.5, 0.1, 1e-4, 2, True)
    assert cfg.model_overrides == {"n_layer": 3}
    assert config(base + ["--log-every", "7"]).log_interval == 7          # the old spelling still works
    d = config(base)
    assert (d.lr, d.batch_size, d.epochs, d.warmup_frac, d.seq_length, d.zero_stage) == (6.25e-5, 32, 3, 0.002, None, None)
    for old in ("--max-len", "--save-dir", "--ds-config"):                  # renamed: one name per setting
        with pytest.raises(SystemExit):
            run.parse_args(base + [old, "1"])


def test_help_lists_every_field_with_key_and_default():
    from dataclasses import fields

    from megagpt.config import FinetuneConfig

    p, _ = run.build_parser()
    text = " ".join(p.format_help().split())
    for f in fields(FinetuneConfig):
        assert f"[finetune.{f.name}, default " in text, f.name


@pytest.mark.parametrize("extra,start", [
    (["--init", "/nonexistent/ckpt"], "--init /nonexistent/ckpt, key 'finetune.init': /nonexistent/ckpt: no such"),
    (["--seq-length", "0"], "--seq-length 0, key 'finetune.seq_length': seq_length=0 must be >= 1"),
    (["--warmup-frac", "1.5"], "--warmup-frac 1.5, key 'finetune.warmup_frac'"),
    (["--zero-stage", "3"], "--zero-stage 3, key 'finetune.zero_stage': zero_stage=3 must be one of 0, 1, 2"),
    (["--task", "cola"], "--task cola, key 'finetune.task': task='cola' must be one of"),
    (["--model-override", "n_layers=2"], "--model-override n_layers=2, key 'finetune.model_overrides': unknown key"),
    (["--init", str(REPO), "--model-override", "n_layer=5"],   # was silently ignored: the checkpoint's model is used
     f"--model-override n_layer=5, key 'finetune.model_overrides': --model-override applies to --init random only; "
     f"the model of {REPO} is used as it is"),
])
def test_errors_name_the_flag(base, extra, start):
    with pytest.raises(MegaGPTError) as e:
        config(base + extra)
    assert str(e.value).startswith(start), str(e.value)
    assert e.value.key == start.split("key '")[1].split("'")[0] and e.value.flag and e.value.file is None


def test_vocab_size_override_is_refused_naming_the_tokenizers_size(base, sp_model):
    """build_model passes the tokenizer's vocab_size and the overrides: get_preset got it twice (TypeError)."""
    from megagpt.tokenizer import load_tokenizer

    n = load_tokenizer(sp_model).vocab_size
    with pytest.raises(MegaGPTError) as e:
        config(base + ["--tokenizer", sp_model, "--model-override", "vocab_size=500"])
    assert str(e.value) == (f"--model-override vocab_size=500, key 'finetune.model_overrides': vocab_size comes "
                            f"from the tokenizer ({n} ids); remove it from --model-override")
    with pytest.raises(MegaGPTError) as e:   # a tokenizer it cannot read is named as that
        config(base + ["--model-override", "vocab_size=500"])
    assert e.value.key == "finetune.tokenizer" and "tok.model: tokenizer not found" in str(e.value)


def test_missing_value_names_the_flag_to_pass(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(MegaGPTError) as e:
        config(["--task", "rte", "--data-root", str(tmp_path / "data")])
    assert str(e.value).startswith("--tokenizer, key 'finetune.tokenizer': missing") and e.value.key == "finetune.tokenizer"
    with pytest.raises(MegaGPTError, match="--task, key 'finetune.task': missing"):
        config([])


def test_yaml_file_with_flags_on_top(tmp_path, base):
    path = tmp_path / "ft.yaml"
    path.write_text(f"finetune:\n  task: rte\n  tokenizer: t\n  data_root: {tmp_path / 'data'}\n  seq_length: 40\n"
                    f"  epochs: 2\n")
    cfg = config(["--config", str(path), "--epochs", "5"])
    assert (cfg.task, cfg.seq_length, cfg.epochs) == ("rte", 40, 5)
    with pytest.raises(MegaGPTError) as e:   # a flag's value is reported as the flag, not at the YAML line
        config(["--config", str(path), "--seq-length", "-1"])
    assert str(e.value).startswith("--seq-length -1, key 'finetune.seq_length'") and e.value.line is None
    path.write_text(f"finetune:\n  task: rte\n  data_root: {tmp_path / 'data'}\n  tokenizer: t\n  max_len: 40\n")
    with pytest.raises(MegaGPTError) as e:
        config(["--config", str(path)])
    assert str(e.value).startswith(f"{path}, line 5, key 'finetune.max_len': unknown key")
    assert (e.value.file, e.value.line, e.value.key) == (str(path), 5, "finetune.max_len")


def test_param_groups_are_pretrainings_rule():
    """The same function for both: on the same GPT, finetuning's groups hold exactly pretraining's
    GPT parameters (embedding tables not decayed), plus the head (weight decayed, bias not)."""
    from megagpt.finetune.heads import FinetuneModel
    from megagpt.model import GPT, get_preset
    from megagpt.train.optim import param_groups

    gpt = GPT(get_preset("tiny-gpt2"))
    ft = FinetuneModel(gpt, "classification", 2)
    pre, fin = param_groups(gpt, 0.01), param_groups(ft, 0.01)
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert [g["weight_decay"] for g in fin] == [g["weight_decay"] for g in pre] == [0.01, 0.0]
    assert ids(fin[0]["params"]) == ids(pre[0]["params"]) + [id(ft.head.weight)]
    assert ids(fin[1]["params"]) == ids(pre[1]["params"]) + [id(ft.head.bias)]
    assert id(gpt.embed.tok.weight) in ids(pre[1]["params"]) and id(gpt.embed.pos.weight) in ids(pre[1]["params"])
    assert len(ids(pre[0]["params"]) + ids(pre[1]["params"])) == len(list(gpt.parameters()))


def _old_finetune_lr_factor(total_steps, warmup_frac):
    """The finetuning schedule before it was expressed through ``lr_at`` (finetune/loop.py lr_lambda)."""
    warmup = max(1, math.ceil(warmup_frac * total_steps))

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return f


@pytest.mark.parametrize("total,frac", [(12, 0.002), (100, 0.1), (37, 0.25), (5, 0.0), (1, 0.5)])
def test_finetune_schedule_is_the_gpt1_formula(total, frac):
    from megagpt.train.schedule import Schedule, build_scheduler

    old, s = _old_finetune_lr_factor(total, frac), Schedule.finetuning(6.25e-5, total, frac)
    for step in range(total):
        assert s.at(step) == pytest.approx(6.25e-5 * old(step), rel=1e-12, abs=1e-20), step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=6.25e-5)
    sched = build_scheduler(opt, s)   # what the engine steps
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(6.25e-5 * old(step), rel=1e-12, abs=1e-20)
        opt.step()
        sched.step()


def test_ds_config_is_pretrainings_builder(base, tmp_path):
    from megagpt.train.distributed import build_ds_config

    cfg = config(base + ["--weight-decay", "0.1", "--clip-grad", "0.5"])
    ds = build_ds_config(None, cfg, 2, micro_batch_size=16, global_batch_size=32, zero_stage=1, required=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 16, 1)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 6.25e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    ds = build_ds_config(str(REPO / "ds_configs/zero2.json"), cfg, 1, micro_batch_size=4, required=False)
    assert ds["zero_optimization"]["stage"] == 2      # no --zero-stage: the JSON's
    with pytest.raises(MegaGPTError) as e:            # a stage that contradicts the JSON
        build_ds_config(str(REPO / "ds_configs/zero2.json"), cfg, 1, micro_batch_size=4, zero_stage=1)
    assert e.value.key == "zero_optimization.stage" and e.value.file.endswith("zero2.json")


def test_cli_error_is_printed_by_rank_0_only(monkeypatch, capsys, tmp_path):
    for rank, printed in (("1", False), ("0", True), (None, True)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            run.main(["--task", "rte", "--data-root", str(tmp_path / "nope"), "--tokenizer", "t"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and bool(err) == printed, (rank, err)
        if printed:
            assert err.startswith("error: --data-root ") and len(err.strip().splitlines()) == 1
