"""Read any checkpoint megagpt knows as one thing (model config, full serial-named weights, tokenizer,
provenance): ``deepspeed`` (a pretraining --save dir, any ZeRO stage and TP/PP layout), ``consolidated``
and ``hf`` (GPT2LMHeadModel, OpenAIGPTLMHeadModel, LlamaForCausalLM). ``open_checkpoint`` reads the
weights only when asked, so callers can refuse early; ``load_model`` gives the model itself.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from megagpt.errors import MegaGPTError
from megagpt.tp import SERIAL

from .consolidated import is_consolidated, load_consolidated, read_meta
from .state_dict import normalize_state_dict
from .tags import is_deepspeed_checkpoint, resolve_tag, step_of
from .tokenizer_files import bundled_tokenizer, recorded_tokenizer


def detect_format(path) -> str:
    """"deepspeed", "consolidated" or "hf", or MegaGPTError saying what the path is not."""
    from megagpt.export.hf import is_hf_dir

    p = Path(path)
    if not p.exists():
        raise MegaGPTError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise MegaGPTError(f"{p}: expected a checkpoint directory")
    for fmt, holds in (("deepspeed", is_deepspeed_checkpoint), ("consolidated", is_consolidated), ("hf", is_hf_dir)):
        if holds(p):
            return fmt
    if step_of(p.name) is not None and is_deepspeed_checkpoint(p.parent):
        raise MegaGPTError(f"{p}: a tag of the DeepSpeed checkpoint {p.parent}, not a checkpoint itself: pass "
                           f"{p.parent} with --tag {p.name}")
    raise MegaGPTError(f"{p}: not a DeepSpeed checkpoint (global_stepN/), a consolidated megagpt checkpoint "
                       f"(config.json with format megagpt-consolidated), nor an HF transformers dir "
                       f"(config.json with model_type)")


@dataclass
class CheckpointSource:
    """One checkpoint, opened: everything but the weights, which ``state_dict()`` reads."""
    path: Path
    format: str
    cfg: Any                       # megagpt.model.ModelConfig
    tag: str | None = None
    step: int | None = None
    run_config: dict | None = None
    tokenizer_path: str | None = None
    read_weights: Callable[[], dict] = field(default=None, repr=False)
    scratch: Any = field(default=None, repr=False)   # keeps a temporary tokenizer copy alive

    @property
    def where(self) -> str:
        return str(self.path / self.tag) if self.tag else str(self.path)

    def state_dict(self) -> dict:
        """Full serial-named fp32 weights, checked against ``cfg``."""
        return normalize_state_dict(self.read_weights(), self.cfg, self.where)

    def meta(self) -> dict:
        return {"format": self.format, "path": str(self.path), "tag": self.tag, "step": self.step,
                "run_config": self.run_config, "tokenizer_path": None if self.scratch else self.tokenizer_path}


def open_checkpoint(path, tag: str | None = None, tokenizer=None) -> CheckpointSource:
    """Open a checkpoint of any format. ``tag``: DeepSpeed only (default: ``tags.resolve_tag``'s). ``tokenizer``:
    a path replacing the checkpoint's own, or False for weights-only readers (none looked up or required)."""
    fmt = detect_format(path)
    if tag is not None and fmt != "deepspeed":
        raise MegaGPTError(f"--tag only applies to DeepSpeed checkpoints; {path} is {fmt}")
    opener = {"deepspeed": _open_deepspeed, "consolidated": _open_consolidated, "hf": _open_hf}[fmt]
    src = opener(Path(path), tag, str(tokenizer) if tokenizer else tokenizer)
    src.tokenizer_path = src.tokenizer_path or None   # False (not wanted) reads as "none"
    return src


def _open_deepspeed(root: Path, tag, tokenizer) -> CheckpointSource:
    from .deepspeed_files import model_config_of, read_client_state, read_weights

    tag = resolve_tag(root, tag)
    client, where = read_client_state(root / tag)
    cfg = model_config_of(client, where)
    if tokenizer is None:   # the files bundled in the tag, else (older checkpoints) the path the client state names
        tokenizer = bundled_tokenizer(root / tag) or recorded_tokenizer(client, root / tag)
    step = client.get("step")
    return CheckpointSource(root, "deepspeed", cfg, tag, step_of(tag) if step is None else step,
                            client.get("config"), tokenizer, lambda: read_weights(root, tag, client, cfg))


def _open_consolidated(root: Path, tag, tokenizer) -> CheckpointSource:
    from megagpt.model import ModelConfig

    meta = read_meta(root)
    return CheckpointSource(root, "consolidated", ModelConfig.from_dict(meta["model"]), None, meta.get("step"),
                            meta.get("megagpt"), bundled_tokenizer(root) if tokenizer is None else tokenizer,
                            lambda: load_consolidated(root)[0])


def _open_hf(root: Path, tag, tokenizer) -> CheckpointSource:
    from megagpt.export.hf import model_config_from_hf, read_hf_weights
    from megagpt.export.hf_tokenizer import import_tokenizer

    cfg, target = model_config_from_hf(root)
    scratch = None
    if tokenizer is None:
        scratch = tempfile.TemporaryDirectory(prefix="megagpt-hf-tokenizer-")   # GPT-2 files under our names
        tokenizer = import_tokenizer(root, Path(scratch.name) / "tok")
        if tokenizer is None or not Path(tokenizer).is_relative_to(scratch.name):
            scratch.cleanup()
            scratch = None
    return CheckpointSource(root, "hf", cfg, None, None, None, tokenizer,
                            lambda: read_hf_weights(root, cfg, target), scratch)


def checked_tokenizer(src: CheckpointSource, more_ok: bool = False):
    """``src``'s tokenizer, loaded (None: it has none), its size checked against the model's vocabulary.
    Fewer ids: the model samples ids the tokenizer cannot decode. More: text encodes to ids the model
    has no row for — ``more_ok`` for conversions (an HF export leaves the ids past the vocabulary out of
    its config: GPT-2 BPE's 3 appended specials, 50260 ids, beside HF gpt2's 50257)."""
    from megagpt.tokenizer import load_tokenizer

    if src.tokenizer_path is None:
        return None
    tok = load_tokenizer(src.tokenizer_path)
    n, vocab = tok.vocab_size, src.cfg.vocab_size
    if n < vocab or (n > vocab and not more_ok):
        why = "it can sample ids the tokenizer cannot decode" if n < vocab else "text encodes to ids it has no row for"
        raise MegaGPTError(f"tokenizer {src.tokenizer_path} has {n} ids but the model of {src.where} has {vocab} "
                           f"({why}): wrong tokenizer for this checkpoint?")
    return tok


class LoadedModel(NamedTuple):
    model: Any        # megagpt.model.GPT, eval mode, fp32
    tokenizer: Any    # megagpt.tokenizer.Tokenizer, or None when the checkpoint has none
    meta: dict        # format, path, tag, step, run_config, tokenizer_path


def load_model(path, tag: str | None = None, tokenizer: str | None = None, tp=SERIAL) -> LoadedModel:
    """A checkpoint of any format → (GPT with its weights, eval mode, fp32; tokenizer; meta). ``tp``:
    this rank's tensor-parallel slice instead (a TPContext; collective-free). A GPT-2 tokenizer from
    an HF dir is loaded from a temporary copy: ``meta["tokenizer_path"]`` is then None."""
    from megagpt.model import GPT

    src = open_checkpoint(path, tag, tokenizer)
    tok = checked_tokenizer(src)   # before the (slow) weights: a wrong tokenizer fails fast
    model = GPT(src.cfg, tp, init=False)
    model.load_full_state_dict(src.state_dict())
    return LoadedModel(model.float().eval(), tok, src.meta())
