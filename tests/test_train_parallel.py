"""The pretraining entry run model-parallel: real `deepspeed --num_gpus 2` launches (gloo, CPU).

  tp2_run   tensor_parallel=2 + sequence_parallel, ZeRO-1, 4 steps saving at 2 and 4:
            trains, checkpoints complete (mp_rank_00/01 files), and the step-2 checkpoint
            consolidated by tools/convert_checkpoint.py into a serial GPT gives, on step 3's batch,
            the loss the TP=2 run logged at step 3 (a cross-layout check of the whole wiring:
            data order, DP sampler, TP model, DeepSpeed checkpoint files, reshaping).
  pp2       pipeline_parallel=2, ZeRO-1: trains 3 steps (DeepSpeed's 1F1B), validates (eval_batch),
            saves layer files, and its step-2 checkpoint passes the same serial-loss check.
  config    pipeline_parallel=2 with ZeRO-2 is refused before launch: one line, exit 2.
"""
import math
import subprocess
import sys

import pytest
import torch

from test_train_runs import REPO, ENV, launch, losses, make_config, ok

pytestmark = pytest.mark.slow   # real multi-process runs; `-m "not slow"` skips them locally


@pytest.fixture(scope="module")
def data(shakespeare_prefix, sp_model):
    return shakespeare_prefix, sp_model


def parallel_config(path, data, parallel, **train):
    """make_config's tiny run (seq 64, 2 layers, 4 heads) plus a parallel section."""
    import yaml

    make_config(path, *data, train={"train_iters": 4, "log_interval": 1, "eval_interval": 0,
                                    "save_interval": 2, **train})
    cfg = yaml.safe_load(path.read_text())
    cfg["parallel"] = parallel
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("tp2")
    cfg = parallel_config(d / "c.yaml", data, {"tensor_parallel": 2})
    r = ok(launch(cfg, "zero1.json", d / "ckpt", "--sequence-parallel"))
    return d, cfg, r


def test_tp2_trains_and_saves(tp2_run):
    d, _, r = tp2_run
    save = d / "ckpt"
    ls = losses(save)
    assert sorted(ls) == [1, 2, 3, 4] and all(math.isfinite(v) for v in ls.values()), ls
    assert "dp=1 tp=2 pp=1 +sp" in r.stdout, r.stdout[-2000:]
    assert (save / "latest").read_text() == "global_step4"
    for tag in ("global_step2", "global_step4"):
        assert (save / tag / "complete").is_file()
        assert sorted(p.name for p in (save / tag).glob("mp_rank_*_model_states.pt")) == [
            "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]


def serial_loss_from_checkpoint(save, cfg_path, tag_step, out):
    """Consolidate ``save``'s step-``tag_step`` tag with tools/convert_checkpoint.py, load it into
    the serial GPT and return its loss on the next step's batch (dp=1, no accumulation)."""
    from megagpt.config import load_config
    from megagpt.data import DistributedBatchSampler, build_gpt_datasets
    from megagpt.checkpoint.consolidated import load_consolidated
    from megagpt.model import GPT
    from megagpt.train.loop import to_batch

    r = subprocess.run([sys.executable, str(REPO / "tools/convert_checkpoint.py"), "--input", str(save), "--output",
                        str(out), "--to", "consolidated", "--tag", f"global_step{tag_step}"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    sd, _ = load_consolidated(out)
    cfg = load_config(cfg_path, {("train", "save"): str(save)})
    t = cfg.train
    model = GPT(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    model.eval()
    gbs = t.micro_batch_size
    train_ds, _, _ = build_gpt_datasets(cfg.data, (t.train_iters * gbs, 0, 0), model.cfg.vocab_size)
    idx = next(iter(DistributedBatchSampler(len(train_ds), tag_step * gbs, t.micro_batch_size, 0, 1)))
    x, y = to_batch(train_ds, idx, "cpu")
    with torch.no_grad():
        return model(x, labels=y).item()


def test_tp2_checkpoint_consolidates_to_serial_loss(tp2_run):
    """Step-2 weights at TP=1 on step 3's batch == the TP=2 run's logged step-3 loss."""
    d, cfg_path, _ = tp2_run
    ls = losses(d / "ckpt")
    loss = serial_loss_from_checkpoint(d / "ckpt", cfg_path, 2, d / "consolidated")
    assert abs(loss - ls[3]) < 1e-4, (loss, ls)


def test_pp2_trains_and_saves_layer_files(tmp_path, data):
    cfg = parallel_config(tmp_path / "c.yaml", data, {"pipeline_parallel": 2}, train_iters=3, save_interval=2,
                          eval_interval=3, eval_iters=1)
    r = ok(launch(cfg, "zero1.json", tmp_path / "ckpt"))
    save = tmp_path / "ckpt"
    ls = losses(save)
    assert sorted(ls) == [1, 2, 3] and all(math.isfinite(v) for v in ls.values()), ls
    assert "dp=1 tp=1 pp=2" in r.stdout and "validation loss" in r.stdout, r.stdout[-2000:]
    tag = save / "global_step3"
    assert (tag / "complete").is_file() and (save / "latest").read_text() == "global_step3"
    # tok, pos, block 0, block 1 (the tied head is layer 0's table): one file per layer
    assert sorted(p.name[:8] for p in tag.glob("layer_*-model_00-model_states.pt")) == [
        "layer_00", "layer_01", "layer_02", "layer_03"]
    loss = serial_loss_from_checkpoint(save, cfg, 2, tmp_path / "consolidated")   # cross-layout check
    assert abs(loss - ls[3]) < 1e-4, (loss, ls)


def test_pp2_with_zero2_is_one_line_exit_2(tmp_path, data):
    """Checked from the launcher's environment before any process group: rank 0 of 2 says it."""
    cfg = parallel_config(tmp_path / "c.yaml", data, {"pipeline_parallel": 2})
    r = subprocess.run([sys.executable, str(REPO / "megagpt/train/pretrain.py"), "--config", cfg,
                        "--deepspeed_config", str(REPO / "ds_configs/zero2.json"), "--save", str(tmp_path)], cwd=REPO,
                       env={**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, capture_output=True,
                       text=True, timeout=120)
    err = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "zero2.json" in err[0] and "pipeline_parallel=2" in err[0] and "stage=2" in err[0]
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("parallel, flags, message", [
    ({"tensor_paralel": 2}, {}, "'parallel.tensor_paralel': unknown key"),
    ({"tensor_parallel": 3}, {}, "tensor_parallel=3 does not divide n_head=4"),
    ({}, {("parallel", "sequence_parallel"): True}, "'parallel.sequence_parallel': needs tensor_parallel > 1"),
    ({"pipeline_parallel": 9}, {}, "9 stages exceed the 5 pipeline layers"),
    ({"partition_method": "even"}, {}, "'parallel.partition_method'"),
])
def test_parallel_section_errors_name_the_key(tmp_path, data, parallel, flags, message):
    from megagpt.config import load_config
    from megagpt.errors import MegaGPTError

    cfg = parallel_config(tmp_path / "c.yaml", data, parallel, save_interval=0)
    with pytest.raises(MegaGPTError, match=message.replace("(", r"\(")) as e:
        load_config(cfg, flags)
    assert "c.yaml" in str(e.value)


def test_parallel_section_defaults_and_cli_override(tmp_path, data):
    from megagpt.config import load_config

    cfg = parallel_config(tmp_path / "c.yaml", data, {"sequence_parallel": True}, save_interval=0)
    c = load_config(cfg, {("parallel", "tensor_parallel"): 2})
    pc = c.parallel
    assert (pc.tensor_parallel, pc.pipeline_parallel, pc.sequence_parallel, pc.partition_method,
            pc.activation_checkpoint_interval, pc.seed) == (2, 1, True, "parameters", 0, c.train.seed)
    assert c.to_dict()["parallel"]["tensor_parallel"] == 2
