"""Readers for the GPT-1 finetuning tasks: GLUE TSV, COPA XML, Story Cloze CSV → ``Example`` lists.

Every reader is strict by default: a malformed row raises ``MegaGPTError`` naming ``file:line``.
With ``skip_bad=True`` bad rows are dropped instead and counted in the returned ``ReadStats`` (the
caller logs the count, so nothing is silently lost).

GLUE TSVs are read with plain ``split("\\t")`` (no CSV quoting): SST-2 and MRPC sentences contain
bare ``"`` characters that a CSV parser would treat as quotes and merge lines.

COPA and Story Cloze ship only a dev/val file, so ``split_examples`` cuts them deterministically
(file order, no shuffling): the first ``train_fraction`` is the train split, the rest is eval.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.errors import MegaGPTError


@dataclass
class Example:
    """One task example. ``texts`` are the text fields in task order; ``label`` is an int class
    (or choice index) or a float score (STS-B); ``choices`` are the answers of multiple choice."""
    texts: list[str]
    label: int | float
    choices: list[str] = field(default_factory=list)
    source: str = ""          # "file:line" for error messages and debugging


@dataclass
class ReadStats:
    path: str
    rows: int = 0
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)


class _RowErrors:
    """Raise or count a bad row, depending on ``skip_bad``."""

    def __init__(self, stats: ReadStats, skip_bad: bool):
        self.stats, self.skip_bad = stats, skip_bad

    def bad(self, where: str, msg: str) -> None:
        if not self.skip_bad:
            raise MegaGPTError(f"{where}: {msg}")
        self.stats.skipped += 1
        if len(self.stats.skipped_where) < 20:
            self.stats.skipped_where.append(where)


# GLUE layouts: column names that must be in the header, and how a row becomes an Example.
_RTE_LABELS = {"entailment": 1, "not_entailment": 0}


def _glue_sst2(c):
    return Example([c["sentence"]], _int_label(c["label"], (0, 1)))


def _glue_rte(c):
    if c["label"] not in _RTE_LABELS:
        raise ValueError(f"label {c['label']!r} is not entailment/not_entailment")
    return Example([c["sentence1"], c["sentence2"]], _RTE_LABELS[c["label"]])


def _glue_mrpc(c):
    return Example([c["#1 String"], c["#2 String"]], _int_label(c["Quality"], (0, 1)))


def _glue_stsb(c):
    score = float(c["score"])
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"score {score} is outside 0..5")
    return Example([c["sentence1"], c["sentence2"]], score)


GLUE_FORMATS = {
    "sst2": (("sentence", "label"), _glue_sst2),
    "rte": (("sentence1", "sentence2", "label"), _glue_rte),
    "mrpc": (("Quality", "#1 String", "#2 String"), _glue_mrpc),
    "stsb": (("sentence1", "sentence2", "score"), _glue_stsb),
}


def _int_label(text: str, allowed) -> int:
    v = int(text)
    if v not in allowed:
        raise ValueError(f"label {v} is not one of {allowed}")
    return v


def _open_text(path):
    p = Path(path)
    if not p.is_file():
        raise MegaGPTError(f"{p}: no such file")
    # utf-8-sig: the MRPC TSVs start with a byte-order mark that would glue onto "Quality".
    return open(p, encoding="utf-8-sig", newline="")


def read_glue(path, task: str, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """Read a GLUE TSV with a header row (SST-2, RTE, MRPC, STS-B)."""
    if task not in GLUE_FORMATS:
        raise MegaGPTError(f"no GLUE reader for task {task!r} (have {', '.join(GLUE_FORMATS)})")
    needed, make = GLUE_FORMATS[task]
    stats, out = ReadStats(str(path)), []
    errors = _RowErrors(stats, skip_bad)
    with _open_text(path) as f:
        header = f.readline().rstrip("\r\n").split("\t")
        missing = [c for c in needed if c not in header]
        if missing:
            raise MegaGPTError(f"{path}:1: header lacks column(s) {', '.join(map(repr, missing))} "
                               f"needed for {task} (header: {header})")
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            stats.rows += 1
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            # STS-B's score is always the last column, even in rows with stray extra tabs.
            if task == "stsb" and len(cols) > len(header):
                cols = cols[:len(header) - 1] + [cols[-1]]
            if len(cols) != len(header):
                errors.bad(where, f"expected {len(header)} tab-separated columns, got {len(cols)}")
                continue
            try:
                ex = make(dict(zip(header, cols)))
            except ValueError as e:
                errors.bad(where, str(e))
                continue
            if any(not t.strip() for t in ex.texts):
                errors.bad(where, "empty text field")
                continue
            ex.source = where
            out.append(ex)
    return out, stats


# COPA: the premise plus a question that says which way the causal link goes. The answer is then
# read as the completion of "premise + question": "My body cast a shadow over the grass. What was
# the cause of this?" → "The sun was rising."
COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}


def read_copa(path, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """COPA XML: ``<item asks-for=cause|effect most-plausible-alternative=1|2><p/><a1/><a2/>``.

    Context = ``premise + " " + COPA_QUESTIONS[asks-for]``; choices = [a1, a2]; label = 0 or 1.
    """
    stats, out = ReadStats(str(path)), []
    errors = _RowErrors(stats, skip_bad)
    p = Path(path)
    with _open_text(p) as f:
        text = f.read()
    try:
        root = ET.fromstring(text.encode("utf-8"))
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        raise MegaGPTError(f"{p}:{line}: invalid XML ({e})") from None
    # ElementTree keeps no line numbers: find each item's line in the text
    item_lines = [i for i, line in enumerate(text.splitlines(), 1) if "<item" in line]
    for n, item in enumerate(root.iter("item")):
        stats.rows += 1
        where = f"{p}:{item_lines[n] if n < len(item_lines) else '?'}"
        asks, right = item.get("asks-for"), item.get("most-plausible-alternative")
        fields = [(item.findtext(tag) or "").strip() for tag in ("p", "a1", "a2")]
        if asks not in COPA_QUESTIONS:
            errors.bad(where, f"item {item.get('id')}: asks-for={asks!r}, expected cause or effect")
        elif right not in ("1", "2"):
            errors.bad(where, f"item {item.get('id')}: most-plausible-alternative={right!r}, expected 1 or 2")
        elif not all(fields):
            errors.bad(where, f"item {item.get('id')}: needs non-empty <p>, <a1> and <a2>")
        else:
            context = f"{fields[0]} {COPA_QUESTIONS[asks]}"
            out.append(Example([context], int(right) - 1, choices=fields[1:], source=where))
    return out, stats


STORYCLOZE_COLUMNS = ("InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                      "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding")


def read_storycloze(path, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """Story Cloze val/test CSV: context = the four sentences joined by spaces; choices = the two
    endings; label = AnswerRightEnding - 1."""
    stats, out = ReadStats(str(path)), []
    errors = _RowErrors(stats, skip_bad)
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise MegaGPTError(f"{path}: empty file") from None
        missing = [c for c in STORYCLOZE_COLUMNS if c not in header]
        if missing:
            raise MegaGPTError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            stats.rows += 1
            if len(row) != len(header):
                errors.bad(where, f"expected {len(header)} comma-separated columns, got {len(row)}")
                continue
            c = dict(zip(header, row))
            if c["AnswerRightEnding"] not in ("1", "2"):
                errors.bad(where, f"AnswerRightEnding={c['AnswerRightEnding']!r}, expected 1 or 2")
                continue
            if not all(c[k].strip() for k in STORYCLOZE_COLUMNS[:6]):
                errors.bad(where, "empty sentence or ending")
                continue
            context = " ".join(c[f"InputSentence{i}"].strip() for i in range(1, 5))
            out.append(Example([context], int(c["AnswerRightEnding"]) - 1,
                               choices=[c["RandomFifthSentenceQuiz1"], c["RandomFifthSentenceQuiz2"]],
                               source=where))
    return out, stats


def split_examples(examples: list, train_fraction: float = 0.8) -> tuple[list, list]:
    """Deterministic split for tasks with a single file: the first ``train_fraction`` of the file
    (in file order) is train, the rest eval. No shuffling, so the split never depends on a seed."""
    if not 0.0 < train_fraction < 1.0:
        raise MegaGPTError(f"split train_fraction must be in (0, 1), got {train_fraction}")
    cut = int(round(len(examples) * train_fraction))
    return examples[:cut], examples[cut:]
