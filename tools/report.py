#!/usr/bin/env python
"""A report of a pretraining run: one PNG of every logged series against steps, and an HTML page
embedding it above a summary table (points, steps, last / min / max value of each series).

    python tools/report.py RUN_DIR [--out DIR]      # writes DIR/report.html and DIR/report.png (DIR: RUN_DIR)

RUN_DIR is a run's --save directory. Series come from its ``train_log.jsonl`` (exact float64 values,
so preferred) and its tensorboard event files (``RUN_DIR/tensorboard/`` or event files in RUN_DIR
itself; float32), whichever has each one: train/validation loss, learning rate, throughput, MFU,
memory, skipped steps, data-wait time, gradient norm and any ``eval/<task>/<metric>`` scores. A
series neither holds is shown as "not logged". A step logged twice (a resumed run repeats the steps
after its checkpoint) keeps the later value. Only the two named outputs are ever written.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file: the checkout's megagpt, not only an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagpt.errors import MegaGPTError, cli_main, first_line  # noqa: E402

# (label, train_log.jsonl key, tensorboard tag) of the standard series, in report order
SERIES = [("train loss", "loss", "train/loss"),
          ("validation loss", "val_loss", "valid/loss"),
          ("learning rate", "lr", "train/lr"),
          ("throughput (tokens/s)", "tokens_per_s", "train/tokens_per_s"),
          ("MFU", "mfu", "train/mfu"),
          ("memory (GiB)", "memory_gib", "train/memory_gib"),
          ("skipped steps (cumulative)", "skipped_steps", "train/skipped_steps"),
          ("data wait (ms/step)", "data_wait_ms", "train/data_wait_ms"),
          ("gradient norm", "grad_norm", "train/grad_norm")]
EVAL_PREFIX = "eval/"
OUTPUTS = ("report.html", "report.png")


def read_jsonl(path: Path) -> tuple[dict, int]:
    """({key: {step: value}} of every numeric key, lines that were not a JSON record with a step).
    A torn last line (a killed run) is one of the latter, not an error."""
    series, bad = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    series.setdefault(k, {})[step] = float(v)
    return series, bad


def event_dirs(run_dir: Path) -> list[Path]:
    """Directories holding tensorboard event files: RUN_DIR/tensorboard (and below), RUN_DIR itself."""
    tb = run_dir / "tensorboard"
    found = {p.parent for p in tb.rglob("events.out.tfevents.*")} if tb.is_dir() else set()
    if any(run_dir.glob("events.out.tfevents.*")):
        found.add(run_dir)
    return sorted(found)


def read_tensorboard(dirs) -> dict:
    """{tag: {step: value}} of every scalar in the event files of ``dirs`` (later files win a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})   # 0: keep every point, not a sample
        try:
            acc.Reload()
        except Exception as e:   # a corrupt event file: say which, keep what the other sources have
            print(f"warning: {d}: tensorboard events unreadable ({first_line(e)})", file=sys.stderr)
            continue
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                series.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    return series


def collect(run_dir: Path) -> tuple[list, list]:
    """([(label, source or None, {step: value})] for the standard and eval series, notes for the page)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MegaGPTError(f"{run_dir}: no such run directory")
    log, dirs = run_dir / "train_log.jsonl", event_dirs(run_dir)
    if not log.is_file() and not dirs:
        raise MegaGPTError(f"{run_dir}: no train_log.jsonl and no tensorboard event files (in {run_dir}/tensorboard/ "
                           f"or {run_dir}/): not a pretraining --save directory, or nothing logged yet")
    notes = []
    js, bad = read_jsonl(log) if log.is_file() else ({}, 0)
    if bad:
        notes.append(f"{log.name}: {bad} line(s) skipped (not a JSON record with a step; e.g. torn by a kill)")
    tb = read_tensorboard(dirs) if dirs else {}
    if not js and not tb:
        raise MegaGPTError(f"{run_dir}: its train_log.jsonl and tensorboard event files hold no logged values")
    rows = []
    for label, key, tag in SERIES:
        if js.get(key):
            rows.append((label, f"{log.name}:{key}", js[key]))
        elif tb.get(tag):
            rows.append((label, f"tensorboard:{tag}", tb[tag]))
        else:
            rows.append((label, None, {}))
    evals = sorted({k for k in js if k.startswith(EVAL_PREFIX)} | {k for k in tb if k.startswith(EVAL_PREFIX)})
    for k in evals:
        rows.append((k, f"{log.name}:{k}", js[k]) if js.get(k) else (k, f"tensorboard:{k}", tb[k]))
    if not evals:
        rows.append(("eval/<task>/<metric>", None, {}))
    return rows, notes


def plot(rows, run_dir) -> bytes:
    """One PNG: a panel per logged series (value against step), in a 3-wide grid."""
    try:
        import matplotlib
    except ImportError:
        raise MegaGPTError("matplotlib is not installed (pip install matplotlib): it draws the report's plot") from None
    matplotlib.use("Agg")   # no display needed
    import matplotlib.pyplot as plt

    logged = [r for r in rows if r[1]]
    cols = 3
    n_rows = max(1, math.ceil(len(logged) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (label, source, pts) in zip(axes.flat, logged):
        steps = sorted(pts)
        ax.plot(steps, [pts[s] for s in steps], marker="." if len(steps) < 50 else None, linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(logged):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _cell(v: float | None) -> str:
    """A value cell: readable text, the exact value in data-value (what a reader or test compares)."""
    if v is None:
        return "<td></td>"
    return f'<td class="num" data-value="{v!r}">{v:.6g}</td>'


def render_html(rows, notes, png: bytes, run_dir) -> str:
    body = []
    for label, source, pts in rows:
        name = f"<td>{html.escape(label)}</td>"
        if not source:
            body.append(f'<tr class="missing" data-series="{html.escape(label)}">{name}'
                        f'<td colspan="7">not logged</td></tr>')
            continue
        steps = sorted(pts)
        vals = [pts[s] for s in steps]
        finite = [v for v in vals if math.isfinite(v)]
        body.append(f'<tr data-series="{html.escape(label)}">{name}<td>{html.escape(source)}</td>'
                    f'<td class="num" data-value="{len(steps)}">{len(steps)}</td>'
                    f'<td class="num" data-value="{steps[0]}">{steps[0]}</td>'
                    f'<td class="num" data-value="{steps[-1]}">{steps[-1]}</td>'
                    f'{_cell(vals[-1])}{_cell(min(finite) if finite else None)}'
                    f'{_cell(max(finite) if finite else None)}</tr>')
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>megagpt run report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}} td.num{{text-align:right;font-family:monospace}}
tr.missing td{{color:#999}} img{{max-width:100%}}</style></head>
<body><h1>Run report</h1><p>{html.escape(str(run_dir))} &middot; generated {when}</p>
<table id="summary"><thead><tr><th>series</th><th>source</th><th>points</th><th>first step</th><th>last step</th>
<th>last</th><th>min</th><th>max</th></tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>{f'<ul class="notes">{note_html}</ul>' if notes else ''}
<p><img alt="series against steps" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>
</body></html>
"""


def write_report(run_dir, out_dir=None) -> tuple[Path, Path]:
    """Write ``report.html`` (table + the plot, embedded) and ``report.png`` into ``out_dir`` (default
    ``run_dir``); nothing else there is touched. Returns their paths."""
    from megagpt.atomic import write_bytes_atomic

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    if out.exists() and not out.is_dir():
        raise MegaGPTError(f"--out {out}: exists and is not a directory")
    rows, notes = collect(run_dir)
    png = plot(rows, run_dir)
    page = render_html(rows, notes, png, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, png_path = (out / name for name in OUTPUTS)
    for p in (html_path, png_path):
        if p.is_dir():
            raise MegaGPTError(f"{p}: is a directory; the report needs that name for a file (use --out)")
    write_bytes_atomic(png_path, png)
    write_bytes_atomic(html_path, page.encode())
    return html_path, png_path


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Report of a pretraining run: a PNG of every logged series against "
                                            "steps and an HTML page with it and a summary table.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's --save directory (train_log.jsonl, tensorboard/)")
    p.add_argument("--out", default=None, help="directory for report.html and report.png (default: RUN_DIR)")
    a = p.parse_args(argv)
    html_path, png_path = write_report(a.run_dir, a.out)
    print(f"wrote {html_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
