"""Config loading and the errors a pretraining run reports before any process group starts; the
LR schedule. All in-process and fast (no launcher)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from megagpt.config import load_config
from megagpt.errors import MegaGPTError
from megagpt.train.distributed import build_ds_config
from megagpt.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


def ds_config_for(path, train, dp_world):
    return build_ds_config(path, train, dp_world, **train.batch_sizes())


def write_cfg(path, prefix, tok, **sections):
    cfg = {"model": {"preset": "tiny"}, "data": {"data_path": [prefix], "tokenizer": tok, "seq_length": 32},
           "train": {"micro_batch_size": 2, "train_iters": 4}}
    for sec, kv in sections.items():
        cfg.setdefault(sec, {}).update(kv)
    Path(path).write_text(yaml.safe_dump(cfg))
    return str(path)


def test_config_loads_preset_overrides_and_vocab_from_tokenizer(tmp_path, shakespeare_prefix, sp_model):
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, model={"n_layer": 3})
    cfg = load_config(path, {("train", "lr"): 1e-3})
    assert cfg.model.n_layer == 3 and cfg.model.n_embd == 64 and cfg.model.vocab_size == 1000
    assert cfg.train.lr == 1e-3 and cfg.data.seq_length == 32
    assert cfg.to_dict()["model"]["name"] == "tiny"


@pytest.mark.parametrize("sections,fragment", [
    ({"train": {"lrr": 1.0}}, "key 'train.lrr': unknown key"),
    ({"trian": {}}, "key 'trian': unknown section"),
    ({"model": {"n_layers": 2}}, "n_layers"),
    ({"train": {"micro_batch_size": "4"}}, "train.micro_batch_size"),
    ({"data": {"data_path": ["/nonexistent/shard"]}}, "/nonexistent/shard"),
    ({"data": {"tokenizer": "/nonexistent/tok.model"}}, "data.tokenizer"),
    ({"data": {"seq_length": 4096}}, "exceeds model max_seq_len"),
    ({"train": {"nan_policy": "ignore"}}, "nan_policy"),
    ({"train": {"adam_beta1": 1.5}}, "key 'train.adam_beta1': adam_beta1=1.5 must be in [0, 1)"),
    ({"train": {"adam_beta2": 1.0}}, "key 'train.adam_beta2'"),
    ({"train": {"adam_eps": 0.0}}, "key 'train.adam_eps': adam_eps=0.0 must be > 0"),
    ({"train": {"save": "c.yaml"}}, "c.yaml: is a file, not a directory"),
    ({"train": {"load": "c.yaml"}}, "key 'train.load'"),
    ({"data": {"tokenizer": "c.yaml"}}, "key 'data.tokenizer': c.yaml: not a valid sentencepiece model"),
    ({"model": {"vocab_size": 500}}, "key 'model.vocab_size': vocab_size=500 is smaller than the 1000 ids"),
    ({"model": {"activation_checkpointing": True}, "parallel": {"pipeline_parallel": 2}},
     "key 'model.activation_checkpointing': pipelines recompute by parallel.activation_checkpoint_interval"),
    ({"train": {"load": "ckpt_typo", "save": "ckpt"}}, "key 'train.load': ckpt_typo: no such directory"),
])
def test_config_errors_name_key_and_file(tmp_path, shakespeare_prefix, sp_model, sections, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)   # "c.yaml" in a section is the config file itself
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, **sections)
    with pytest.raises(MegaGPTError) as e:
        load_config(path)
    assert fragment in str(e.value) and str(tmp_path / "c.yaml") in str(e.value)


def test_unknown_key_error_has_yaml_line(tmp_path, shakespeare_prefix, sp_model):
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, train={"warmup": 3})
    line = next(i + 1 for i, l in enumerate(Path(path).read_text().splitlines()) if "warmup" in l)
    with pytest.raises(MegaGPTError, match=f"line {line}, key 'train.warmup'"):
        load_config(path)


def test_ds_config_auto_filled_and_batch_checked(tmp_path, shakespeare_prefix, sp_model):
    cfg = load_config(write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model,
                                train={"gradient_accumulation_steps": 3, "weight_decay": 0.1}))
    ds = ds_config_for(str(REPO / "ds_configs/zero2.json"), cfg.train, dp_world=2)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    cfg.train.global_batch_size = 10
    with pytest.raises(MegaGPTError, match="global_batch_size=10 != micro_batch_size 2 x gradient_accumulation_steps 3"):
        ds_config_for(str(REPO / "ds_configs/zero2.json"), cfg.train, dp_world=2)
    cfg.train.global_batch_size = None
    bad = json.loads((REPO / "ds_configs/zero2.json").read_text())
    bad["zero_optimisation"] = bad.pop("zero_optimization")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MegaGPTError, match="unknown DeepSpeed config key.*zero_optimisation"):
        ds_config_for(str(tmp_path / "bad.json"), cfg.train, dp_world=1)
    bad = json.loads((REPO / "ds_configs/zero2.json").read_text())
    bad["train_batch_size"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MegaGPTError, match="bad.json, key 'train_batch_size': is 7 but the megagpt config gives 6"):
        ds_config_for(str(tmp_path / "bad.json"), cfg.train, dp_world=1)
    bad = json.loads((REPO / "ds_configs/zero2.json").read_text())
    bad["zero_optimization"]["stage3_prefetch_bucket_sizee"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MegaGPTError, match="zero_optimization"):
        ds_config_for(str(tmp_path / "bad.json"), cfg.train, dp_world=1)


def test_every_shipped_ds_config_is_valid(tmp_path, shakespeare_prefix, sp_model):
    cfg = load_config(write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model))
    names = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json", "zero2_bf16.json",
            "zero2_fp16.json"} <= set(names)
    readme = (REPO / "ds_configs/README.md").read_text()
    for n in names:
        assert n in readme, f"{n} not explained in ds_configs/README.md"
        ds_config_for(str(REPO / "ds_configs" / n), cfg.train, dp_world=4)


def test_cli_error_is_one_line_exit_2_before_process_group(tmp_path, shakespeare_prefix, sp_model, capsys):
    from megagpt.train.pretrain import main
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, train={"micro_batch_sizes": 4})
    with pytest.raises(SystemExit) as e:
        main(["--config", path, "--deepspeed_config", str(REPO / "ds_configs/zero1.json")])
    assert e.value.code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.micro_batch_sizes" in err and len(err.splitlines()) == 1
    # same through the file entry the launcher runs, in a fresh interpreter
    r = subprocess.run([sys.executable, str(REPO / "megagpt/train/pretrain.py"), "--config", path,
                        "--deepspeed_config", str(REPO / "ds_configs/zero1.json")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 2 and "error: " in r.stderr and "train.micro_batch_sizes" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_model_parallel_size_the_world_cannot_hold_names_its_flag(tmp_path, shakespeare_prefix, sp_model, capsys):
    from megagpt.train.pretrain import main
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model)
    with pytest.raises(SystemExit) as e:
        main(["--config", path, "--deepspeed_config", str(REPO / "ds_configs/zero1.json"), "--tensor-parallel", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --tensor-parallel 2, key 'parallel.tensor_parallel': world "
                                                "size 1 is not divisible"), err


def test_lr_schedule_warmup_cosine_constant():
    assert lr_at(0, 2.5e-4, 0.0, 2000, 100000, "cosine") == pytest.approx(2.5e-4 / 2000)
    assert lr_at(1999, 2.5e-4, 0.0, 2000, 100000, "cosine") == pytest.approx(2.5e-4)
    mid = 2000 + (100000 - 2000) // 2
    assert lr_at(mid, 2.5e-4, 1e-5, 2000, 100000, "cosine") == pytest.approx(1e-5 + 0.5 * (2.5e-4 - 1e-5))
    assert lr_at(100000, 2.5e-4, 1e-5, 2000, 100000, "cosine") == pytest.approx(1e-5)
    assert lr_at(10**6, 2.5e-4, 1e-5, 2000, 100000, "cosine") == pytest.approx(1e-5)
    assert lr_at(5000, 1e-3, 0.0, 10, 100, "constant") == 1e-3
    steps = [lr_at(s, 1.0, 0.0, 5, 50, "cosine") for s in range(60)]
    assert all(a <= b for a, b in zip(steps[:5], steps[1:5])) and all(a >= b for a, b in zip(steps[4:], steps[5:]))
    assert not any(math.isnan(x) for x in steps)


@pytest.mark.parametrize("name,preset", [("tiny_cpu", "tiny"), ("gpt1", "gpt1"), ("gpt2_small", "gpt2-small")])
def test_shipped_example_configs_load(name, preset, shakespeare_prefix, sp_model):
    cfg = load_config(REPO / "configs" / f"{name}.yaml",
                      {("data", "data_path"): [shakespeare_prefix], ("data", "tokenizer"): sp_model})
    assert cfg.model.name == preset and cfg.model.vocab_size == 1000  # from the tokenizer
    assert cfg.data.seq_length <= cfg.model.max_seq_len
    if name == "gpt1":
        assert (cfg.train.lr, cfg.train.lr_warmup_iters, cfg.train.lr_decay_style) == (2.5e-4, 2000, "cosine")
        ds_config_for(str(REPO / "ds_configs/zero2.json"), cfg.train, dp_world=8)  # 8 x 8 = 64


# ---- one typed tree, errors with their key, generated flags ----------------------------------
def test_sections_are_typed_and_seq_length_resolves_from_the_model(tmp_path, shakespeare_prefix, sp_model):
    from megagpt.config import DataConfig, DebugConfig, ModelConfig, ParallelConfig, TrainConfig

    cfg = load_config(write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, model={"max_seq_len": 48},
                                data={"seq_length": None}, train={"seed": 7}))
    assert (type(cfg.model), type(cfg.data), type(cfg.train), type(cfg.parallel), type(cfg.debug)) == (
        ModelConfig, DataConfig, TrainConfig, ParallelConfig, DebugConfig)
    assert cfg.data.seq_length == 48 and cfg.parallel.seed == 7 and cfg.model is cfg.model  # built once
    assert DataConfig([shakespeare_prefix]).seq_length is None       # one default: "the model's max_seq_len"
    assert "seed" not in cfg.to_dict()["parallel"] and cfg.to_dict()["data"]["seq_length"] == 48


@pytest.mark.parametrize("section,key", [("model", "n_layers"), ("data", "seq_len"), ("train", "lrr"),
                                         ("parallel", "tp"), ("debug", "inject")])
def test_unknown_key_in_every_section_names_file_line_key(tmp_path, shakespeare_prefix, sp_model, section, key):
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, **{section: {key: 1}})
    line = next(i + 1 for i, l in enumerate(Path(path).read_text().splitlines()) if l.strip().startswith(key + ":"))
    with pytest.raises(MegaGPTError) as e:
        load_config(path)
    assert (e.value.key, e.value.file, e.value.line) == (f"{section}.{key}", path, line)
    assert str(e.value).startswith(f"{path}, line {line}, key '{section}.{key}': unknown key")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("section,key,value", [("model", "n_layer", "3"), ("data", "seq_length", "32"),
                                               ("train", "micro_batch_size", 2.5), ("parallel", "tensor_parallel", 1.5),
                                               ("debug", "dump_weights", "yes"), ("train", "progress_bar", 1)])
def test_wrong_type_names_the_key(tmp_path, shakespeare_prefix, sp_model, section, key, value):
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model, **{section: {key: value}})
    with pytest.raises(MegaGPTError) as e:
        load_config(path)
    assert e.value.key == f"{section}.{key}" and e.value.line is not None
    assert f"key '{section}.{key}': {key}={value!r} must be of type" in str(e.value)


def test_flag_value_is_reported_as_the_flag_not_the_yaml_line(tmp_path, shakespeare_prefix, sp_model):
    from megagpt.train.pretrain import parse_args

    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model)   # has data.seq_length: 32 on a line
    _, overrides = parse_args(["--config", path, "--seq-length", "99"])
    with pytest.raises(MegaGPTError) as e:
        load_config(path, overrides)
    assert str(e.value) == "--seq-length 99, key 'data.seq_length': seq_length=99 exceeds model max_seq_len=64"
    assert (e.value.key, e.value.flag, e.value.file, e.value.line) == ("data.seq_length", "--seq-length 99", None, None)
    _, overrides = parse_args(["--config", path, "--tensor-model-parallel-size", "3"])
    with pytest.raises(MegaGPTError, match=r"^--tensor-model-parallel-size 3, key 'parallel.tensor_parallel': "):
        load_config(path, overrides)
    _, overrides = parse_args(["--config", path, "--lr-decay-style=linearr"])
    with pytest.raises(MegaGPTError, match=r"^--lr-decay-style linearr, key 'train.lr_decay_style': .* one of cosine"):
        load_config(path, overrides)
    with pytest.raises(MegaGPTError) as e:   # set in code (not a flag): the file, but not the key's line
        load_config(path, {("data", "seq_length"): 99})
    assert str(e.value).startswith(f"{path}, key 'data.seq_length': ") and e.value.line is None


def test_flags_set_the_fields_with_megatron_aliases(tmp_path, shakespeare_prefix, sp_model):
    from megagpt.train.pretrain import parse_args

    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model)
    a, overrides = parse_args(["--config", path, "--seq-length", "16", "--tensor-model-parallel-size", "2",
                               "--pipeline-model-parallel-size", "2", "--sequence-parallel", "--no-progress-bar",
                               "--deepspeed_config", "ds.json", "--data-path", shakespeare_prefix, "--local_rank=0",
                               "--lr", "1e-3", "--data-seed", "3", "--partition-method", "uniform"])
    cfg = load_config(path, overrides)
    assert (cfg.data.seq_length, cfg.data.seed, cfg.data.data_path) == (16, 3, [shakespeare_prefix])
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.sequence_parallel,
            cfg.parallel.partition_method) == (2, 2, True, "uniform")
    assert (cfg.train.progress_bar, cfg.train.deepspeed_config, cfg.train.lr) == (False, "ds.json", 1e-3)
    assert parse_args(["--config", path, "--tensor-parallel", "2"])[1] == {("parallel", "tensor_parallel"): 2}
    assert parse_args(["--config", path])[1] == {}          # nothing given, nothing overridden


def test_help_lists_every_field_with_yaml_key_and_default():
    from dataclasses import fields

    from megagpt.config import DataConfig, ParallelConfig, TrainConfig
    from megagpt.train.pretrain import build_parser

    text = " ".join(build_parser()[0].format_help().split())
    for section, cls in (("data", DataConfig), ("train", TrainConfig), ("parallel", ParallelConfig)):
        for f in fields(cls):
            if f.name == "seed" and section == "parallel":
                continue   # not a config key: train.seed
            assert f"[{section}.{f.name}, default " in text, f"{section}.{f.name}"
    for flag in ("--seq-length", "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--deepspeed_config",
                 "--sequence-parallel", "--no-progress-bar", "--data-path", "--save", "--load", "--train-iters"):
        assert flag in text, flag
    assert "[train.lr, default 0.00025]" in text and "[data.seq_length, default model.max_seq_len]" in text


def test_four_sections_check_types_one_way():
    """ModelConfig, DataConfig, ParallelConfig and the train/debug/finetune sections share one checker."""
    from megagpt.config import DataConfig, DebugConfig, FinetuneConfig, ModelConfig, ParallelConfig, TrainConfig
    from megagpt.schema import Section

    for cls in (DataConfig, DebugConfig, FinetuneConfig, ModelConfig, ParallelConfig, TrainConfig):
        assert issubclass(cls, Section), cls
    for make, key in ((lambda: ModelConfig(n_layer=True), "n_layer"), (lambda: ParallelConfig(tensor_parallel="2"),
                      "tensor_parallel"), (lambda: TrainConfig(lr="1"), "lr"), (lambda: DataConfig(["x"], seed=1.0),
                                                                                 "seed")):
        with pytest.raises(MegaGPTError, match="must be of type") as e:
            make()
        assert e.value.key == key


def test_error_key_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(MegaGPTError("bad", key="train.lr", file="c.yaml", line=3)))
    assert (e.key, e.file, e.line, str(e)) == ("train.lr", "c.yaml", 3, "c.yaml, line 3, key 'train.lr': bad")


def test_pretrain_error_after_parse_is_printed_by_rank_0_only(tmp_path, shakespeare_prefix, sp_model, capsys,
                                                              monkeypatch):
    from megagpt.train.pretrain import main

    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model)
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            main(["--config", path, "--seq-length", "99", "--deepspeed_config", str(REPO / "ds_configs/zero1.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and bool(err) == printed
    assert err == "error: --seq-length 99, key 'data.seq_length': seq_length=99 exceeds model max_seq_len=64\n"


def test_a_first_run_loads_nothing_from_its_own_save_dir_and_a_yaml_key_given_twice_is_refused(
        tmp_path, shakespeare_prefix, sp_model):
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model,
                     train={"save": str(tmp_path / "new"), "load": str(tmp_path / "new")})
    assert load_config(path).train.load == str(tmp_path / "new")   # the README's first run: nothing to load yet
    text = Path(path).read_text().replace("model:\n", "model:\n  n_layer: 2\n  n_layer: 3\n")
    Path(path).write_text(text)
    first = text.splitlines().index("  n_layer: 2") + 1
    with pytest.raises(MegaGPTError, match=f"c.yaml, line {first + 1}, key 'model.n_layer': given twice "
                                           f"\\(first at line {first}\\)"):
        load_config(path)


def test_yaml_exponent_floats_are_numbers_and_an_empty_file_is_refused(tmp_path, shakespeare_prefix, sp_model):
    """YAML 1.1 (PyYAML's default) reads ``3e-3`` as a string, which the type check then refused; an empty
    file would train the default 124M model without a word."""
    path = write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model)
    Path(path).write_text(Path(path).read_text() + "  lr: 3e-3\n  min_lr: 1E-5\n")
    t = load_config(path).train
    assert (t.lr, t.min_lr) == (3e-3, 1e-5)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(MegaGPTError, match="empty.yaml: config file is empty"):
        load_config(tmp_path / "empty.yaml")


def test_deepspeed_json_that_is_not_an_object_and_fp16_without_a_device_are_one_line(tmp_path, shakespeare_prefix,
                                                                                    sp_model):
    from megagpt.train.distributed import check_device

    cfg = load_config(write_cfg(tmp_path / "c.yaml", shakespeare_prefix, sp_model))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(MegaGPTError, match="list.json: the top level must be a JSON object"):
        ds_config_for(str(tmp_path / "list.json"), cfg.train, dp_world=1)
    fp16 = str(REPO / "ds_configs/zero1_fp16.json")
    ds = ds_config_for(fp16, cfg.train, dp_world=1)   # a valid file: the device decides
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().is_fp16_supported():
        pytest.skip("this device runs fp16")
    with pytest.raises(MegaGPTError, match="zero1_fp16.json, key 'fp16.enabled': fp16 is not supported on this "
                                           "device \\(cpu\\)"):
        check_device(ds, fp16)
    check_device(ds_config_for(str(REPO / "ds_configs/zero1_bf16.json"), cfg.train, dp_world=1), fp16)
    from megagpt.train.pretrain import main   # the entry, before any process group
    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "c.yaml"), "--deepspeed_config", fp16])
    assert e.value.code == 2 and not dist.is_initialized()
