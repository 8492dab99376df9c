"""Evaluation with EleutherAI's lm-evaluation-harness (docs/evaluation.md).

``harness.MegaGPTLM`` is the model (registered as ``megagpt``); ``tasks/`` holds offline task
YAMLs reading local files; ``evaluate`` runs tasks on a model; ``periodic`` runs them during
pretraining. lm-eval is imported only when something is evaluated.
"""
from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

from megagpt.errors import MegaGPTError

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def task_names() -> list[str]:
    """The tasks shipped in ``tasks/`` (each YAML's file name is its task name)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def check_tasks(tasks, key: str | None = None) -> list[str]:
    """``tasks`` (a list or a comma-separated string) as a list of known task names, or one clear error."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise MegaGPTError("no task given; available: " + ", ".join(task_names()), key=key)
    unknown = [t for t in names if t not in task_names()]
    if unknown:
        raise MegaGPTError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(task_names())}", key=key)
    return names


@contextlib.contextmanager
def _quiet_harness():
    """lm-eval logs every task's loading at INFO/WARNING: keep its errors only. Its per-task
    progress bar is forced on; make it tqdm's automatic one (off when stderr is no terminal: no
    ``\\r`` redraws in piped logs)."""
    import functools

    import lm_eval.api.task as task_module
    from tqdm import tqdm

    log = logging.getLogger("lm_eval")
    level, bar = log.level, getattr(task_module, "tqdm", None)
    log.setLevel(logging.ERROR)
    if bar is tqdm:
        task_module.tqdm = functools.partial(tqdm, disable=None)
    try:
        yield
    finally:
        log.setLevel(level)
        if bar is tqdm:
            task_module.tqdm = bar


@contextlib.contextmanager
def preserved_rng():
    """lm-eval seeds python, numpy and torch: a run's own random streams must not notice."""
    import numpy as np
    import torch

    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def evaluate(lm, tasks, limit=None, data_dir=None, lambada_text=None, log_samples=False, quiet=True) -> dict:
    """Run ``tasks`` (names from ``tasks/``) on ``lm`` (a ``MegaGPTLM`` or any lm-eval LM) with
    ``lm_eval.simple_evaluate``; returns its results dict. ``data_dir``/``lambada_text``: see
    ``tasks/utils.py``. Zero-shot, no bootstrap (stderr is not computed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .tasks.utils import resolve_data_dir

    names = check_tasks(tasks)
    meta = {"data_dir": str(resolve_data_dir(data_dir))}
    if lambada_text:
        meta["lambada_text"] = str(lambada_text)
    with _quiet_harness() if quiet else contextlib.nullcontext():
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=0,
                               log_samples=log_samples)


def scores(results: dict) -> dict:
    """``{task: {metric: value}}`` from a results dict (lm-eval's ``"acc,none"`` keys → ``"acc"``)."""
    out = {}
    for task, row in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in row.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out
