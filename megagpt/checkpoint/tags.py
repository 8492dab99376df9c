"""Which tag of a DeepSpeed checkpoint directory to read: the one rule every reader follows.

``engine.save`` has every rank write ``global_stepN/``, then rank 0 writes the ``complete`` marker and
only then ``latest``. So the checkpoint is the newest tag with the marker, and an explicit tag
without it is refused (the run died writing it); ``latest``, a tag behind after a crash between the
two writes, is only a hint for DeepSpeed's own tools. A directory with no marker at all was written
by DeepSpeed alone, which writes ``latest`` after its files: there ``latest`` (or a tag) is the checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

from megagpt.errors import MegaGPTError

COMPLETE = "complete"
LATEST = "latest"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def step_tags(ckpt_dir) -> list[tuple[int, str]]:
    """(step, tag) of every ``global_stepN`` dir, complete or not, oldest first."""
    dirs = [p.name for p in Path(ckpt_dir).glob("global_step*") if p.is_dir()]
    return sorted((step_of(t), t) for t in dirs if step_of(t) is not None)


def complete_tags(ckpt_dir) -> list[tuple[int, str]]:
    """(step, tag) of every tag dir with a ``complete`` marker, oldest first."""
    return [(s, t) for s, t in step_tags(ckpt_dir) if (Path(ckpt_dir) / t / COMPLETE).is_file()]


def newest_complete_tag(ckpt_dir) -> str | None:
    return next((tag for _, tag in reversed(complete_tags(ckpt_dir))), None)


def is_deepspeed_checkpoint(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / LATEST).is_file() or bool(step_tags(p)))


def resolve_tag(ckpt_dir, tag: str | None = None) -> str:
    """The tag to read under ``ckpt_dir`` (see the module docstring); MegaGPTError naming why not."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise MegaGPTError(f"{root}: no such checkpoint directory")
    newest = newest_complete_tag(root)
    deepspeed_only = newest is None and (root / LATEST).is_file()   # no megagpt marker anywhere
    if tag is not None:
        if not (root / tag).is_dir():
            have = ", ".join(t for _, t in step_tags(root)) or "none"
            raise MegaGPTError(f"{root}: no checkpoint tag {tag!r} (found: {have})")
        if not deepspeed_only and not (root / tag / COMPLETE).is_file():
            raise MegaGPTError(f"{root / tag}: incomplete checkpoint (no '{COMPLETE}' marker: the run died "
                               f"while saving it){f'; the newest complete tag is {newest}' if newest else ''}")
        return tag
    if newest is not None:
        return newest
    if deepspeed_only:
        tag = (root / LATEST).read_text().strip()
        if not (root / tag).is_dir():
            raise MegaGPTError(f"{root / LATEST}: names tag {tag!r}, which does not exist")
        return tag
    raise MegaGPTError(f"{root}: no complete checkpoint (no global_stepN/ with a '{COMPLETE}' marker, "
                       f"no DeepSpeed '{LATEST}' file)")
