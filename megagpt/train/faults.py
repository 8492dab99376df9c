"""Test-only fault injection (the ``debug:`` config section, no flags): each hook breaks a run the
way a real fault would, so tests/test_faults.py, test_bad_steps.py, test_elastic.py and
test_train_runs.py can prove the recovery. All no-ops unless a ``debug`` field is set."""
from __future__ import annotations

import json
import os
import signal
import time

import torch.distributed as dist


class FaultInjector:
    def __init__(self, debug, save_dir: str | None, engine):
        self.debug, self.save_dir, self.engine = debug, save_dir, engine
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._grad_hook = None

    def before_step(self, step: int, rollbacks: int, ids) -> float | None:
        """Called as step ``step`` starts with this rank's sample ``ids``; returns the factor for the
        step's loss (NaN, or x10 for a spike on the first attempt), or None."""
        d = self.debug
        if d.step_delay_s:
            time.sleep(d.step_delay_s)
        if step in (d.hang_at_step, d.kill_at_step) and self.rank == self.world - 1:   # a lost rank
            if d.kill_at_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        if d.sample_ids and ids is not None and self.save_dir:   # proves which samples each step saw
            os.makedirs(self.save_dir, exist_ok=True)
            with open(os.path.join(self.save_dir, f"samples_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "ids": [i for m in ids for i in m]}) + "\n")
        if d.nan_grad_at_step == step and self.rank == 1:   # a NaN gradient with a finite loss, on one rank:
            last = list(self.engine.module.parameters())[-1]   # its last parameter (not a tied one)
            self._grad_hook = last.register_hook(lambda g: g * float("nan"))
        return (float("nan") if d.inject_nan_at_step == step else
                10.0 if d.spike_at_step == step and not rollbacks else None)

    def after_step(self) -> None:
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
