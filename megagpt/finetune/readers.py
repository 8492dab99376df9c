"""Readers for the GPT-1 finetuning tasks: GLUE TSV, COPA XML, Story Cloze CSV → ``Example`` lists.

A malformed row raises ``MegaGPTError`` naming ``file:line``; with ``skip_bad=True`` it is dropped
and counted in ``ReadStats`` instead (the caller logs the count: nothing is silently lost).
GLUE TSVs are split on tabs with no CSV quoting (SST-2 and MRPC sentences contain bare ``"`` that a
CSV parser would take for quotes, merging lines), so a tab inside a sentence makes a bad row.
"""
from __future__ import annotations

import csv
import io
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


def read_text(path) -> str:
    """The whole file as UTF-8; a stray byte (a binary file given by mistake) is one error naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise MegaGPTError(f"{p}: no such file")
    raw = p.read_bytes()
    try:   # the MRPC TSVs start with a byte-order mark that would glue onto "Quality"
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise MegaGPTError(f"{p}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           f"re-save the file as UTF-8") from None


def _collect(path, rows, make, skip_bad: bool) -> tuple[list[Example], ReadStats]:
    """``(where, row)`` pairs → Examples; a row whose ``make`` raises ValueError is bad."""
    stats, out = ReadStats(str(path)), []
    for where, row in rows:
        stats.rows += 1
        try:
            ex = make(row)
            if any(not t.strip() for t in ex.texts):
                raise ValueError("empty text field")
        except ValueError as e:
            if not skip_bad:
                raise MegaGPTError(f"{where}: {e}") from None
            stats.skipped += 1
            if len(stats.skipped_where) < 20:
                stats.skipped_where.append(where)
            continue
        ex.source = where
        out.append(ex)
    return out, stats


def _read_table(path, rows, needed, sep: str, make, skip_bad: bool, what: str):
    """(line, columns) rows, the header first, blank rows ``[]`` → ``make({column: value})`` Examples."""
    _, header = next(rows, (1, []))
    if not header:
        raise MegaGPTError(f"{path}:1: no header row")
    missing = [c for c in needed if c not in header]
    if missing:
        raise MegaGPTError(f"{path}:1: header lacks column(s) {', '.join(map(repr, missing))} "
                           f"needed for {what} (header: {header})")

    def example(cols):
        if len(cols) != len(header):
            raise ValueError(f"expected {len(header)} {sep}-separated columns, got {len(cols)}")
        return make(dict(zip(header, cols)))
    return _collect(path, ((f"{path}:{n}", cols) for n, cols in rows if cols), example, skip_bad)


def _binary(text: str) -> int:
    v = int(text)
    if v not in (0, 1):
        raise ValueError(f"label {v} is not one of (0, 1)")
    return v


def _entailment(text: str) -> int:
    if text not in ("entailment", "not_entailment"):
        raise ValueError(f"label {text!r} is not entailment/not_entailment")
    return int(text == "entailment")


def _score(text: str) -> float:
    score = float(text)
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"score {score} is outside 0..5")
    return score


# GLUE layouts: the text columns, the label column and its parser.
GLUE_FORMATS = {
    "sst2": (("sentence",), "label", _binary),
    "rte": (("sentence1", "sentence2"), "label", _entailment),
    "mrpc": (("#1 String", "#2 String"), "Quality", _binary),
    "stsb": (("sentence1", "sentence2"), "score", _score),
}


def read_glue(path, task: str, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """Read a GLUE TSV with a header row (SST-2, RTE, MRPC, STS-B)."""
    if task not in GLUE_FORMATS:
        raise MegaGPTError(f"no GLUE reader for task {task!r} (have {', '.join(GLUE_FORMATS)})")
    texts, label, parse = GLUE_FORMATS[task]
    lines = (line.rstrip("\r\n") for line in io.StringIO(read_text(path), newline=""))
    rows = enumerate((line.split("\t") if line else [] for line in lines), 1)
    return _read_table(path, rows, (*texts, label), "tab", lambda c: Example([c[k] for k in texts], parse(c[label])),
                       skip_bad, task)


# COPA: the premise plus a question that says which way the causal link goes, so the answer reads as
# its completion: "My body cast a shadow over the grass. What was the cause of this?" → "The sun was rising."
COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}


def _copa_item(item) -> Example:
    asks, right = item.get("asks-for"), item.get("most-plausible-alternative")
    premise, *choices = [(item.findtext(tag) or "").strip() for tag in ("p", "a1", "a2")]
    if asks not in COPA_QUESTIONS:
        raise ValueError(f"item {item.get('id')}: asks-for={asks!r}, expected cause or effect")
    if right not in ("1", "2"):
        raise ValueError(f"item {item.get('id')}: most-plausible-alternative={right!r}, expected 1 or 2")
    if not (premise and all(choices)):
        raise ValueError(f"item {item.get('id')}: needs non-empty <p>, <a1> and <a2>")
    return Example([f"{premise} {COPA_QUESTIONS[asks]}"], int(right) - 1, choices=choices)


def read_copa(path, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """COPA XML: ``<item asks-for=cause|effect most-plausible-alternative=1|2><p/><a1/><a2/>`` →
    context ``premise + " " + COPA_QUESTIONS[asks-for]``, choices [a1, a2], label 0 or 1."""
    text = read_text(path)
    try:
        root = ET.fromstring(text.encode("utf-8"))
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        raise MegaGPTError(f"{path}:{line}: invalid XML ({e})") from None
    # ElementTree keeps no line numbers: find each item's line in the text
    lines = [i for i, line in enumerate(text.splitlines(), 1) if "<item" in line]
    items = ((f"{path}:{lines[n] if n < len(lines) else '?'}", item) for n, item in enumerate(root.iter("item")))
    return _collect(path, items, _copa_item, skip_bad)


STORYCLOZE_COLUMNS = ("InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                      "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding")


def _story(c) -> Example:
    if c["AnswerRightEnding"] not in ("1", "2"):
        raise ValueError(f"AnswerRightEnding={c['AnswerRightEnding']!r}, expected 1 or 2")
    if not all(c[k].strip() for k in STORYCLOZE_COLUMNS[:6]):
        raise ValueError("empty sentence or ending")
    return Example([" ".join(c[k].strip() for k in STORYCLOZE_COLUMNS[:4])], int(c["AnswerRightEnding"]) - 1,
                   choices=[c["RandomFifthSentenceQuiz1"], c["RandomFifthSentenceQuiz2"]])


def read_storycloze(path, skip_bad: bool = False) -> tuple[list[Example], ReadStats]:
    """Story Cloze CSV: context = the four sentences joined by spaces, choices = the two endings."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows = ((reader.line_num, row) for row in reader)   # line_num: the line where the row ends
    return _read_table(path, rows, STORYCLOZE_COLUMNS, "comma", _story, skip_bad, "storycloze")


def split_examples(examples: list, train_fraction: float = 0.8) -> tuple[list, list]:
    """Deterministic split for tasks with a single file: the first ``train_fraction`` of the file
    (in file order) is train, the rest eval. No shuffling, so the split never depends on a seed."""
    if not 0.0 < train_fraction < 1.0:
        raise MegaGPTError(f"split train_fraction must be in (0, 1), got {train_fraction}")
    cut = int(round(len(examples) * train_fraction))
    return examples[:cut], examples[cut:]
