"""Harness tasks during pretraining: every ``train.eval_harness_interval`` steps (and at the end).

Every rank gathers the full serial weights (``parallel.layout.full_state_dict``: a collective at
any TP/PP layout and ZeRO-3), so every layout is evaluated as one serial model (the weights the
engine computes with: a bf16 run's bf16 copy). Rank 0 alone builds a serial fp32 copy on its
device and runs the tasks while the others wait in one all-reduce that also carries whether rank 0
failed (so an evaluation error stops every rank with a message instead of hanging them). That wait counts against ``train.distributed_timeout_minutes``:
keep ``eval_harness_limit`` small. lm-eval seeds the global RNGs; they are restored afterwards,
so a run with harness evaluation trains exactly like one without.
Scalars: ``eval/<task>/<metric>`` to tensorboard and to ``train_log.jsonl`` (one line per evaluation).
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megagpt.errors import MegaGPTError, first_line


class PeriodicEval:
    def __init__(self, cfg, device):
        from . import check_tasks
        from .tasks.utils import resolve_data_dir

        t = cfg.train
        self.tasks = check_tasks(t.eval_harness_tasks, key="train.eval_harness_tasks")
        self.interval, self.limit, self.device = t.eval_harness_interval, t.eval_harness_limit, device
        try:   # fail at start-up, on every rank alike, not at the first evaluation
            import lm_eval  # noqa: F401
        except ImportError:
            raise MegaGPTError("train.eval_harness_tasks needs lm-eval (pip install lm-eval)",
                               key="train.eval_harness_tasks") from None
        self.data_dir = str(resolve_data_dir(t.eval_harness_data_dir))
        self.tokenizer = cfg.data.tokenizer

    def due(self, step: int, last: bool) -> bool:
        return step % self.interval == 0 or last

    def run(self, engine, step: int, metrics) -> dict | None:
        """Evaluate the engine's current weights; rank 0 logs and returns ``{task: {metric: value}}``."""
        from megagpt.parallel.layout import full_state_dict

        full = full_state_dict(engine)   # every rank takes part
        result, error = None, ""
        if dist.get_rank() == 0:
            try:
                result = self._evaluate(getattr(engine, "module", engine).cfg, full)
            except Exception as e:   # noqa: BLE001 - reported to every rank below
                error = str(e) if isinstance(e, MegaGPTError) else first_line(e)
        del full
        failed = torch.tensor([1.0 if error else 0.0], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise MegaGPTError(f"harness evaluation at step {step} failed"
                               + (f": {error}" if error else " on rank 0"), key="train.eval_harness_tasks")
        if result is not None:
            self._log(metrics, step, result)
        return result

    def _evaluate(self, model_cfg, full: dict) -> dict:
        from megagpt.model import GPT
        from megagpt.tokenizer import load_tokenizer

        from . import evaluate, preserved_rng, scores
        from .harness import MegaGPTLM

        model = GPT(model_cfg, init=False)
        model.load_full_state_dict({k: v.float() for k, v in full.items()})
        lm = MegaGPTLM(model=model, tok=load_tokenizer(self.tokenizer), device=str(self.device))
        with preserved_rng():
            return scores(evaluate(lm, self.tasks, limit=self.limit, data_dir=self.data_dir))

    @staticmethod
    def _log(metrics, step: int, result: dict) -> None:
        flat = {f"eval/{task}/{name}": value for task, row in result.items() for name, value in row.items()}
        metrics.print(f"step {step:>6} | harness " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in flat.items()))
        if getattr(metrics, "jsonl", None):
            metrics.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
            metrics.jsonl.flush()
        if getattr(metrics, "writer", None):
            for k, v in flat.items():
                metrics.writer.add_scalar(k, v, step)
