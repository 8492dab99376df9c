"""Every checkpoint megagpt reads or writes (docs/export.md, docs/parallelism.md): ``tags`` (which tag
to read), ``engine`` (crash-safe save/resume of a live DeepSpeed engine), ``tokenizer_files`` (the
tokenizer inside checkpoints), ``state_dict`` (one normalisation of loaded weights),
``deepspeed_files`` (ZeRO 0-3, TP, PP files → one state dict), ``consolidated`` (the unsharded
format), ``load`` (``load_model`` from DeepSpeed, consolidated or HF dirs), ``convert`` (to
consolidated or HF) and ``elastic`` (resume a training state on another layout).
"""


def __getattr__(name):   # lazy: ``from megagpt.checkpoint import load_model`` does not import torch up front
    if name in ("load_model", "open_checkpoint"):
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
