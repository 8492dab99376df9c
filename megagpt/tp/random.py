"""TP-aware random state: which dropout masks match across tensor-parallel ranks and which differ.

* Default generator (seeded by ``parallel.layout.build_model``: ``seed + 1000 * dp_rank + 100 *
  pp_rank``): identical on every TP rank of a replica's stage, so dropout on *replicated*
  activations (embedding, residual outside sequence parallelism) draws the same mask everywhere,
  as the serial model would once.
* Tracker generator (``tracker.fork()``): seeded ``seed + 2718 + 100 * pp_rank + tp_rank`` —
  different per TP rank, for dropout on *split* activations (attention probabilities, which are
  per head; any activation that sequence parallelism splits along the sequence). Initial
  weights never use it: they come from one layout-free serial stream (model/gpt.py).

Activation checkpointing must replay the tracker as well as the default generator:
``checkpoint(tracker, fn, *args)`` restores the tracker state for the recomputation. The
tracker's state is saved per rank with each checkpoint (checkpoint/engine.py ``rng_state``).
"""
import contextlib

import torch
import torch.utils.checkpoint


def _cuda_on() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGTracker:
    """The per-TP-rank stream: a CPU state, and a CUDA state created (from the same seed) the
    first time ``fork`` runs with CUDA initialised — so a tracker built before CUDA starts never
    falls back to the shared default CUDA stream."""

    def __init__(self, seed: int, tp_rank: int, pp_rank: int = 0):
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self.reseed(seed, seed_default=False)

    def reseed(self, seed: int, seed_default: bool = True) -> None:
        """Restart both streams from ``seed`` (the default generator too, unless told not to).

        After the model is built, ``reseed(seed + 1000 * dp_rank)`` gives each data-parallel
        replica its own dropout masks while TP ranks keep agreeing on the replicated ones."""
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
        if self._cuda is None and _cuda_on():
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
    (torch's checkpoint restores only the default generator)."""
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
