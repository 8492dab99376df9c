"""The best finetuned model: ``<save_dir>/best``, written by rank 0 to a temporary sibling directory
renamed into place when complete, and read back."""
from __future__ import annotations

import json
from pathlib import Path

from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError


def save_best(save_dir, state_dict: dict, info: dict, tokenizer_path=None) -> Path:
    """Atomically replace ``<save_dir>/best`` with the finetuned weights (GPT + head, full) and ``info``."""
    from megagpt.checkpoint.tokenizer_files import TOKENIZER_DIR, write_tokenizer
    from megagpt.export.hf import write_safetensors

    out = Path(save_dir) / "best"
    with atomic_dir(out, force=True) as tmp:
        write_safetensors({k: v.float() for k, v in state_dict.items()}, tmp / "model.safetensors")
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2, default=str))
        if tokenizer_path:   # the one tokenizer layout of every megagpt checkpoint
            write_tokenizer(tokenizer_path, tmp / TOKENIZER_DIR)
    return out


def load_finetuned(path):
    """``<save_dir>/best`` → (state_dict, info); its tokenizer: ``tokenizer_files.bundled_tokenizer``."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "model.safetensors").is_file() or not (p / "finetune.json").is_file():
        raise MegaGPTError(f"{p}: not a finetuned checkpoint (needs model.safetensors and finetune.json)")
    return load_file(str(p / "model.safetensors")), json.loads((p / "finetune.json").read_text())
