"""One normalisation for every state dict read from disk: wrapper prefixes (``module.``,
``_orig_mod.``, a finetuning wrapper's ``gpt.``), a tied embedding under only one of its names
(``zero_to_fp32`` re-adds a shared parameter only sometimes) and the dtype do not matter; a
missing, extra or wrongly shaped tensor means the weights are not for this config, and is named.
"""
from __future__ import annotations

import torch

from megagpt.errors import MegaGPTError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "gpt.")


def strip_wrappers(sd: dict, names) -> dict:
    """Remove wrapper prefixes shared by every key, while no key is a model name yet."""
    names = set(names)
    while sd and not names & set(sd):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def normalize_state_dict(sd: dict, cfg, where) -> dict:
    """``sd`` in serial GPT names, fp32, checked against ``cfg``; with tied embeddings both names
    hold the one tensor (as in the model, where they are one Parameter)."""
    from megagpt.model.gpt import full_shapes
    from megagpt.model.sharding import with_tied_names

    shapes = full_shapes(cfg)
    sd = {k: v.detach().to(torch.float32) for k, v in strip_wrappers(dict(sd), shapes).items()}
    sd = with_tied_names(sd, cfg)
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in shapes.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or wrong:
        raise MegaGPTError(f"{where}: weights do not match the model config (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]})")
    return {k: sd[k] for k in shapes}


# the ModelConfig fields that change what a model computes without changing any tensor's shape
_ARCH_FIELDS = ("vocab_size", "n_head", "num_kv_heads", "norm", "norm_position", "norm_eps", "pos_emb", "rope_theta",
                "activation", "bias", "tie_embeddings")


def architecture_mismatch(theirs, ours) -> str | None:
    """The first difference between two ModelConfigs that makes weights of one wrong for the other: a
    tensor (name and shapes, in the model's parameter order), else a field; None when they fit."""
    from megagpt.model.gpt import full_shapes

    a, b = full_shapes(theirs), full_shapes(ours)
    for name, shape in b.items():
        if name not in a:
            return f"tensor {name} {shape}: the checkpoint has no such tensor"
        if a[name] != shape:
            return f"tensor {name}: checkpoint {a[name]} != config {shape}"
    extra = [n for n in a if n not in b]
    if extra:
        return f"tensor {extra[0]} {a[extra[0]]}: in the checkpoint, not in the config's model"
    for f in _ARCH_FIELDS:
        if f == "rope_theta" and ours.pos_emb != "rope":
            continue
        if getattr(theirs, f) != getattr(ours, f):
            return f"model.{f}: checkpoint {getattr(theirs, f)!r} != config {getattr(ours, f)!r}"
    return None
