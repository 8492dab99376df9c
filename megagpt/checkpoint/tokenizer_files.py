"""The tokenizer inside a checkpoint, one layout: ``tokenizer/`` with ``tokenizer.model`` (sentencepiece)
or ``encoder.json`` + ``vocab.bpe`` (GPT-2 BPE; or its ``tokenizer.json`` when that is what the user had), and
``spec.json``. A consolidated checkpoint holds it at
its root; a DeepSpeed one in every tag, written before the ``complete`` marker, so each tag stays whole
on its own (``keep_last`` pruning, copying one tag) for a few hundred KB. Older checkpoints only name the
user's file in their client state (``{"tokenizer": {"type", "path"}}``); ``recorded_tokenizer`` reads those.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megagpt.errors import MegaGPTError

TOKENIZER_DIR = "tokenizer"


def write_tokenizer(tokenizer_path, dest) -> None:
    """Copy a sentencepiece .model file or a GPT-2 BPE directory into ``dest`` (created if needed)."""
    src, dest = Path(tokenizer_path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, dest / "tokenizer.model")
        spec = {"type": "sentencepiece", "file": "tokenizer.model"}
    elif src.is_dir():
        from megagpt.tokenizer import gpt2_files

        for name in gpt2_files(src):   # the files that define the ids, as the folder has them
            shutil.copyfile(src / name, dest / name)
        spec = {"type": "gpt2-bpe", "dir": "."}
    else:
        raise MegaGPTError(f"{src}: not a sentencepiece .model file nor a dir with encoder.json + vocab.bpe")
    (dest / "spec.json").write_text(json.dumps(spec, indent=2))


def bundled_tokenizer(holder) -> str | None:
    """``load_tokenizer``'s path of the ``tokenizer/`` in ``holder`` (a consolidated dir or a tag), or None."""
    tdir = Path(holder) / TOKENIZER_DIR
    if (tdir / "tokenizer.model").is_file():
        return str(tdir / "tokenizer.model")
    if (tdir / "encoder.json").is_file() or (tdir / "tokenizer.json").is_file():
        return str(tdir)
    return None


def recorded_tokenizer(client_state: dict, where) -> str | None:
    """The tokenizer path an older checkpoint's client state names, or None; MegaGPTError if it is gone."""
    path = (client_state.get("tokenizer") or {}).get("path")
    if path and not Path(path).exists():
        raise MegaGPTError(f"{where}: the checkpoint's tokenizer {path} no longer exists (checkpoints written "
                           f"before tokenizers were stored inside only name the file); pass --tokenizer PATH")
    return path or None
