"""Weights & Biases as a metrics sink (``train.wandb_project``): a real tiny run in W&B's offline mode,
its ``.wandb`` run file read back record by record and compared with train_log.jsonl; and the one
line a run gets when the key is set but wandb is not installed.
"""
import json
import math
import struct
import subprocess
import sys
import time

import pytest
import yaml

from megagpt.train import pretrain
from test_train_runs import ENV, REPO


def tiny_run(d, prefix, tok, train=None, env=None, timeout=300):
    """One plain-python rank (ZeRO-0), 6 steps: logs at 2, 4, 6, validation at 3 and 6, a NaN loss at
    step 3 that is skipped (so ``skipped_steps`` is 1 from then on)."""
    cfg = {"model": {"preset": "tiny", "max_seq_len": 32},
           "data": {"data_path": [prefix], "tokenizer": tok, "split": "949,50,1", "seq_length": 32},
           "train": {"micro_batch_size": 2, "train_iters": 6, "lr": 3e-3, "log_interval": 2, "eval_interval": 3,
                     "eval_iters": 1, "progress_bar": False, **(train or {})},
           "debug": {"inject_nan_at_step": 3}}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "megagpt.train.pretrain", "--config", str(d / "c.yaml"),
                        "--deepspeed_config", str(REPO / "ds_configs/zero0.json"), "--save", str(d / "run")],
                       cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r.seconds = time.time() - t0
    return d / "run", r


def read_wandb_records(path):
    """Every Record of a ``.wandb`` run file: W&B's 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:   # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:   # zero fill up to the next block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):   # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def history(records) -> dict:
    """{key: {step: value}} from the history records."""
    out = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            step = rec.history.step.num
            for item in rec.history.item:
                out.setdefault(item.key or "/".join(item.nested_key), {})[step] = json.loads(item.value_json)
    return out


_SHARED = {}


def shared_run(tmp_path_factory, prefix, tok):
    """The one tiny run (W&B offline on, tensorboard, jsonl) this module and tests/test_report.py both
    read: launched once per pytest process (launches are the expensive part of these tests)."""
    if "run" not in _SHARED:
        d = tmp_path_factory.mktemp("wandb")
        save, r = tiny_run(d, prefix, tok, train={"wandb_project": "megagpt-test", "wandb_run_name": "tiny-offline"},
                           env={"WANDB_MODE": "offline", "WANDB_DIR": str(d), "WANDB_SILENT": "true"})
        print(f"tiny run with W&B: {r.seconds:.1f} s")
        runs = list((d / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, list(d.rglob("*"))
        _SHARED["run"] = save, runs[0], r
    return _SHARED["run"]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, shakespeare_prefix, sp_model):
    return shared_run(tmp_path_factory, shakespeare_prefix, sp_model)


@pytest.mark.slow
def test_offline_run_file_holds_the_logged_scalars(wandb_run):
    save, run_file, _ = wandb_run
    log = [json.loads(ln) for ln in (save / "train_log.jsonl").read_text().splitlines()]
    train = {rec["step"]: rec for rec in log if "tokens_per_s" in rec}   # the log_interval records
    val = {rec["step"]: rec["val_loss"] for rec in log if "val_loss" in rec}
    assert sorted(train) == [2, 4, 6] and sorted(val) == [3, 6]
    records = read_wandb_records(run_file)
    h = history(records)
    # the same scalars as tensorboard, at the same steps, with the exact values of the jsonl log
    assert h["train/loss"] == {s: rec["loss"] for s, rec in train.items()}
    assert h["train/skipped_steps"] == {2: 0, 4: 1, 6: 1}
    assert h["train/mfu"] == {s: rec["mfu"] for s, rec in train.items()}
    assert h["valid/loss"] == val
    assert max(h["train/loss"]) == 6 and not math.isnan(h["train/loss"][6])
    run = next(rec.run for rec in records if rec.WhichOneof("record_type") == "run")
    assert run.project == "megagpt-test" and run.display_name == "tiny-offline"
    assert (save / "wandb_run_id").read_text() == run.run_id   # a resumed run continues this W&B run


def test_without_wandb_installed_one_line(tmp_path, capsys, monkeypatch, shakespeare_prefix, sp_model):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` now raises ImportError
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"data_path": [shakespeare_prefix], "tokenizer": sp_model},
        "train": {"wandb_project": "p"}}))
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "train.wandb_project" in err[0] and "wandb is not installed" in err[0] and "c.yaml" in err[0], err


def test_scalars_written_through_the_writer_reach_wandb(tmp_path, monkeypatch):
    """Code that writes ``metrics.writer.add_scalar`` (megagpt/eval/periodic.py's harness scores) and
    ``Metrics.log_scalars`` reach W&B as they reach tensorboard; the save dir keeps the run id."""
    from megagpt.train.metrics import Metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)   # default: the save directory
    m = Metrics(0, str(tmp_path / "tb"), None, 1, 1, 1, 1.0, "test", 10, 0, False,
                wandb={"project": "p", "name": None, "save_dir": str(tmp_path / "save"), "config": {"a": 1}})
    m.writer.add_scalar("eval/copa/acc", 0.75, 4)
    m.log_scalars(5, {"eval/rte/acc": 0.5})
    m.close()
    run_file, = (tmp_path / "save" / "wandb").glob("offline-run-*/run-*.wandb")
    h = history(read_wandb_records(run_file))
    assert h.get("eval/copa/acc") == {4: 0.75} and h.get("eval/rte/acc") == {5: 0.5}, h
    assert run_file.name == f"run-{(tmp_path / 'save' / 'wandb_run_id').read_text()}.wandb"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
