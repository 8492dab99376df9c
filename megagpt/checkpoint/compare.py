"""Compare two checkpoints tensor by tensor, the check behind "resume is bit-exact" (tools/verify_resume.py):
every tensor and number in every rank's DeepSpeed files of a tag (weights, fp32 masters, optimizer moments,
step counters) except the recorded run config, which names each launch's own flags."""
from __future__ import annotations

import math
from pathlib import Path

import torch

_SKIP = ("config", "ds_config", "ds_version")


def leaves(obj, path=""):
    """(path, value) of every tensor and number inside a loaded checkpoint file."""
    if isinstance(obj, (torch.Tensor, int, float)) and not isinstance(obj, bool):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _SKIP:
                yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def first_difference(tag_a, tag_b) -> tuple[str | None, int]:
    """(None, tensors compared) if every ``*_states.pt`` of the two tag dirs holds the same values, else
    (the first difference in one line, tensors compared)."""
    files, other = (sorted(p.name for p in Path(t).glob("*_states.pt")) for t in (tag_a, tag_b))
    if not files or files != other:
        return f"different checkpoint files: {files} vs {other}", 0
    compared = 0
    for f in files:
        a, b = (dict(leaves(torch.load(Path(t) / f, map_location="cpu", weights_only=False))) for t in (tag_a, tag_b))
        if a.keys() != b.keys():
            return f"{f}: different entries {sorted(set(a) ^ set(b))[:3]}", compared
        for k in a:
            if not _same(a[k], b[k]):
                if isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor) and a[k].shape == b[k].shape:
                    d = (a[k].double() - b[k].double()).abs()
                    return (f"{f} {k}: {int((d > 0).sum())} of {d.numel()} elements differ, "
                            f"max |diff| {d.max().item():.3g}"), compared
                return f"{f} {k}: {a[k]!r} vs {b[k]!r}", compared
            compared += isinstance(a[k], torch.Tensor)
    return None, compared
