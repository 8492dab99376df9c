"""tools/report.py on a real tiny run's output: the HTML summary table holds exactly the logged values
(train_log.jsonl's float64), the PNG is embedded, series a run did not log read "not logged", a run
known only by its tensorboard events still reports (eval scores included), and nothing but the two
named outputs is written. A directory without logs is one error line.
"""
import base64
import importlib.util
import json
import math
import shutil
from html.parser import HTMLParser

import pytest

from test_train_runs import REPO
from test_wandb import shared_run

_spec = importlib.util.spec_from_file_location("report_tool", REPO / "tools" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


class Table(HTMLParser):
    """{series: {"source": text, "cells": [data-value of each numeric cell]}} and the embedded image."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.row, self.img, self.texts = {}, None, None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-series" in a:
            self.row = self.rows[a["data-series"]] = {"cells": [], "text": []}
        elif tag == "td" and self.row is not None and "data-value" in a:
            self.row["cells"].append(a["data-value"])
        elif tag == "img":
            self.img = a["src"]

    def handle_data(self, data):
        if self.row is not None and data.strip():
            self.row["text"].append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None


def jsonl(save):
    return [json.loads(ln) for ln in (save / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare_prefix, sp_model):
    """tests/test_wandb.py's tiny run (6 steps, NaN skipped at 3, validation at 3 and 6), launched once."""
    return shared_run(tmp_path_factory, shakespeare_prefix, sp_model)[0]


def last(series: dict):
    step = max(series)
    return step, series[step]


@pytest.mark.slow
def test_table_holds_the_logged_values_and_only_its_outputs_are_written(run, capsys):
    (run / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert report.main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'} and {run / 'report.png'}"
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert set(after) - set(before) == {run / "report.html", run / "report.png"}
    assert all(after[p] == b for p, b in before.items())   # nothing else changed

    log = jsonl(run)
    by_key = {}
    for rec in log:
        for k, v in rec.items():
            if k != "step":
                by_key.setdefault(k, {})[rec["step"]] = v
    t = Table((run / "report.html").read_text())
    # cells: points, first step, last step, last, min, max — the exact logged float64 values
    loss = t.rows["train loss"]
    assert loss["text"][1] == "train_log.jsonl:loss"
    assert loss["cells"][:3] == ["6", "1", "6"] and float(loss["cells"][3]) == last(by_key["loss"])[1]
    finite = [v for v in by_key["loss"].values() if not math.isnan(v)]   # step 3's NaN: skipped
    assert len(finite) == 5 and float(loss["cells"][4]) == min(finite) and float(loss["cells"][5]) == max(finite)
    assert t.rows["skipped steps (cumulative)"]["cells"][3] == "1.0"
    for label, key in (("validation loss", "val_loss"), ("learning rate", "lr"), ("throughput (tokens/s)",
                       "tokens_per_s"), ("MFU", "mfu"), ("memory (GiB)", "memory_gib"),
                       ("data wait (ms/step)", "data_wait_ms")):
        row = t.rows[label]
        steps = sorted(by_key[key])
        assert row["cells"][:3] == [str(len(steps)), str(steps[0]), str(steps[-1])], label
        assert float(row["cells"][3]) == by_key[key][steps[-1]], label
    assert t.rows["validation loss"]["cells"][:3] == ["2", "3", "6"]
    # ZeRO-0 in fp32 exposes no gradient norm, and this run ran no task evaluation
    assert t.rows["gradient norm"]["text"][1:] == ["not logged"] and "grad_norm" not in by_key
    assert t.rows["eval/<task>/<metric>"]["text"][1:] == ["not logged"]
    png = (run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and t.img == "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.slow
def test_tensorboard_events_alone_with_eval_scores(run, tmp_path):
    """A run dir holding only tensorboard events (float32) plus task scores sent through
    ``Metrics.log_scalars``: every series comes from the events, the eval score gets its row."""
    import numpy as np

    from megagpt.train.metrics import Metrics

    shutil.copytree(run / "tensorboard", tmp_path / "run" / "tensorboard")
    m = Metrics(0, str(tmp_path / "run" / "tensorboard"), None, 1, 1, 1, 1.0, "test", 6, 6, False)
    m.log_scalars(6, {"eval/copa/acc": 0.625})
    m.close()
    report.write_report(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.png"]
    t = Table((tmp_path / "out" / "report.html").read_text())
    loss = t.rows["train loss"]
    assert loss["text"][1] == "tensorboard:train/loss" and loss["cells"][:3] == ["3", "2", "6"]
    logged = {rec["step"]: rec["loss"] for rec in jsonl(run) if "loss" in rec}
    assert float(loss["cells"][3]) == float(np.float32(logged[6]))
    assert t.rows["validation loss"]["text"][1] == "tensorboard:valid/loss"
    assert t.rows["eval/copa/acc"]["text"][1] == "tensorboard:eval/copa/acc"
    assert t.rows["eval/copa/acc"]["cells"][:4] == ["1", "6", "6", "0.625"]


def test_directory_without_logs_is_one_line(tmp_path, capsys):
    for d, why in ((tmp_path, "no train_log.jsonl and no tensorboard event files"),
                   (tmp_path / "missing", "no such run directory")):
        with pytest.raises(SystemExit) as e:
            report.main([str(d)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and str(d) in err[0] and why in err[0], err
    assert list(tmp_path.iterdir()) == []   # and it wrote nothing


def test_log_scalars_reach_the_jsonl_and_the_report(tmp_path):
    """``Metrics.log_scalars`` (the hook for task evaluation scores) writes the jsonl log the report reads."""
    from megagpt.train.metrics import Metrics

    m = Metrics(0, None, str(tmp_path / "train_log.jsonl"), 1, 1, 1, 1.0, "test", 10, 0, False)
    m.log_scalars(5, {"eval/rte/acc": 0.5})
    m.log_scalars(10, {"eval/rte/acc": 0.5625, "eval/copa/acc": 0.75})
    m.close()
    (tmp_path / "train_log.jsonl").open("a").write('{"step": 11, "eval/rte/ac')   # a torn last line
    report.write_report(tmp_path)
    t = Table((tmp_path / "report.html").read_text())
    assert t.rows["eval/rte/acc"]["cells"][:4] == ["2", "5", "10", "0.5625"]
    assert t.rows["eval/copa/acc"]["cells"][:4] == ["1", "10", "10", "0.75"]
    assert t.rows["train loss"]["text"][1:] == ["not logged"]
    assert "1 line(s) skipped" in (tmp_path / "report.html").read_text()
