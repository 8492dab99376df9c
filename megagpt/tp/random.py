"""TP-aware random state: which dropout masks match across tensor-parallel ranks and which differ.

* Default generator (seeded by ``parallel.layout.build_model``): identical on every TP rank of a
  replica's stage, so dropout on *replicated* activations draws the mask the serial model would.
* Tracker generator (``tracker.fork()``, seed ``seed + 2718 + 100 * pp_rank + tp_rank``): differs
  per TP rank, for dropout on *split* activations (attention heads; sequence-parallel chunks).
  Initial weights never use it (model/gpt.py ``init_stream``). Activation checkpointing replays it
  too (``checkpoint``); checkpoints save it per rank (checkpoint/engine.py ``rng_state``).
"""
import contextlib

import torch
import torch.utils.checkpoint


class RNGTracker:
    """The per-TP-rank stream: a CPU state, and a CUDA state created (same seed) once CUDA is
    initialised, so a tracker built before CUDA starts never falls back to the default CUDA stream."""

    def __init__(self, seed: int, tp_rank: int, pp_rank: int = 0):
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self.reseed(seed, seed_default=False)

    def reseed(self, seed: int, seed_default: bool = True) -> None:
        """Restart both streams from ``seed`` (the default generator too, unless told not to).
        ``reseed(seed + 1000 * dp_rank)`` gives each data-parallel replica its own dropout masks."""
        self.default_seed = seed + 100 * self.pp_rank
        self.tp_seed = seed + 2718 + 100 * self.pp_rank + self.tp_rank
        self._cpu = torch.Generator().manual_seed(self.tp_seed).get_state()
        self._cuda = None
        if seed_default:
            self.seed_default()

    def seed_default(self) -> None:
        """Seed the default generator (same on all TP/DP ranks of a stage)."""
        torch.manual_seed(self.default_seed)

    def _ensure_cuda(self) -> None:
        if self._cuda is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            outer = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(self.tp_seed)
            self._cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self):
        """Run the body on the per-TP-rank generator; the default generator is left untouched."""
        self._ensure_cuda()
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state() if self._cuda is not None else None
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda)
        try:
            yield
        finally:
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self._cuda is not None:
                self._cuda = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)

    def get_state(self):
        self._ensure_cuda()
        return self._cpu, self._cuda

    def set_state(self, state) -> None:
        self._cpu, self._cuda = state


def checkpoint(tracker: RNGTracker, fn, *args):
    """Non-reentrant activation checkpoint of ``fn(*args)`` that replays the tracker's state too
    (torch's checkpoint restores only the default generator); torch's alone if tracker is None."""
    if tracker is None:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    saved = {}

    def run(*a):
        if "state" not in saved:                   # first (real) forward
            saved["state"] = tracker.get_state()
            return fn(*a)
        current = tracker.get_state()              # recomputation in backward
        tracker.set_state(saved["state"])
        try:
            return fn(*a)
        finally:
            tracker.set_state(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
