"""Task metrics in numpy (scipy/sklearn are optional in deployments): accuracy, F1, Pearson,
Spearman (with average ranks for ties, as scipy does)."""
from __future__ import annotations

import numpy as np

from megagpt.errors import MegaGPTError


def _arrays(preds, labels):
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise MegaGPTError(f"metrics: predictions {p.shape} and labels {y.shape} must be equal-length vectors")
    if p.size == 0:
        raise MegaGPTError("metrics: no examples to score")
    return p, y


def accuracy(preds, labels) -> float:
    p, y = _arrays(preds, labels)
    return float((p == y).mean())


def f1(preds, labels, positive=1) -> float:
    """Binary F1 of the ``positive`` class (MRPC reports F1 of 'paraphrase' = 1)."""
    p, y = _arrays(preds, labels)
    tp = float(((p == positive) & (y == positive)).sum())
    fp = float(((p == positive) & (y != positive)).sum())
    fn = float(((p != positive) & (y == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def pearson(x, y) -> float:
    x, y = _arrays(x, y)
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)  # constant input: no correlation


def rankdata(a) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0   # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    x, y = _arrays(x, y)
    return pearson(rankdata(x), rankdata(y))


# a task's metric kind → its metrics ("accuracy_f1": MRPC, "correlation": STS-B)
KINDS = {"accuracy": {"accuracy": accuracy}, "accuracy_f1": {"accuracy": accuracy, "f1": f1},
         "correlation": {"pearson": pearson, "spearman": spearman}}


def compute(kind: str, preds, labels) -> dict:
    if kind not in KINDS:
        raise MegaGPTError(f"unknown metric kind {kind!r}")
    return {name: fn(preds, labels) for name, fn in KINDS[kind].items()}
