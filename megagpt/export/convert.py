"""Consolidated megagpt checkpoint ⇄ HF transformers directory, and ``load_model``.

Export picks the one HF architecture that computes exactly what the megagpt model computes
(``hf_target``): Llama for RMSNorm/RoPE/SwiGLU, GPT-2 for pre-LN LayerNorm/learned/GELU, OpenAI
GPT for post-LN; anything the target cannot express is refused with every offending field named.
Weights move through the per-architecture name tables (``hf_gpt2``, ``hf_openai_gpt``,
``hf_llama``): entries ``(ours, hf, op)`` with op ``"copy"``, ``"T"`` (Conv1D transpose),
``"vocab"`` (padded rows dropped on export, zero rows re-added on import) or ``("rows", a, b)``
(Llama's q/k/v slices of our fused qkv). Both directions read the same table, so they are inverses.

All outputs are written to a temporary sibling directory and renamed into place when complete.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError

from . import hf_gpt2, hf_llama, hf_openai_gpt
from .consolidated import load_consolidated, read_meta, save_consolidated, tokenizer_path_in
from .hf_tokenizer import export_tokenizer, import_tokenizer, read_json, special_token_ids

log = logging.getLogger("megagpt.export")

ARCHS = {m.ARCHITECTURE: m for m in (hf_gpt2, hf_openai_gpt, hf_llama)}
_BY_MODEL_TYPE = {m.MODEL_TYPE: m for m in (hf_gpt2, hf_openai_gpt, hf_llama)}
# HF buffers (not parameters) that older checkpoints carry; they hold no trained state
_IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=None, leave=False)


# ---------------------------------------------------------------------------------- export
def hf_target(cfg, approximate_gelu: bool = False):
    """The name-table module of the HF architecture that matches ``cfg`` exactly, or MegaGPTError."""
    if cfg.norm == "rmsnorm" or cfg.pos_emb == "rope" or cfg.activation == "swiglu":
        target, bad = hf_llama, hf_llama.refusals(cfg)
    elif cfg.norm_position == "pre":
        target, bad = hf_gpt2, hf_gpt2.refusals(cfg)
    else:
        target, bad = hf_openai_gpt, hf_openai_gpt.refusals(cfg, approximate_gelu)
    if bad:
        raise MegaGPTError(
            f"model {cfg.name!r} has no faithful HF transformers equivalent (nearest: {target.ARCHITECTURE}); "
            f"offending field(s): {'; '.join(bad)}")
    return target


def _to_hf_tensor(t, op, cfg):
    if op == "T":
        return t.T
    if op == "vocab":
        return t[: cfg.vocab_size]
    if isinstance(op, tuple):
        return t[op[1]: op[2]]
    return t


def to_hf_state_dict(sd: dict, cfg, target=None) -> dict:
    """Our state dict (padded vocab) → HF names and layouts of ``target`` (default: ``hf_target(cfg)``)."""
    target = target or hf_target(cfg)
    out = {}
    for ours, hf, op in _progress(target.names(cfg), "to HF"):
        if ours not in sd:
            raise MegaGPTError(f"checkpoint lacks {ours!r}, which model config {cfg.name!r} has")
        out[hf] = _to_hf_tensor(sd[ours], op, cfg).contiguous()
    return out


def _write_safetensors(tensors: dict, dest: Path, max_shard_size) -> None:
    """model.safetensors, or HF-style shards + model.safetensors.index.json when larger."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in _progress(list(split.filename_to_tensors.items()), "writing shards"):
        save_file({n: tensors[n] for n in names}, str(dest / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def consolidated_to_hf(src, out, force: bool = False, dtype: str = "float32", approximate_gelu: bool = False,
                       max_shard_size="5GB") -> Path:
    """A consolidated megagpt checkpoint → an HF transformers dir (weights, config, tokenizer)."""
    from transformers import GenerationConfig

    from megagpt.model import ModelConfig

    if dtype not in _DTYPES:
        raise MegaGPTError(f"dtype {dtype!r} must be one of {', '.join(_DTYPES)}")
    if Path(out).exists() and not force:   # refusals first, before reading (large) weights
        raise MegaGPTError(f"{out}: already exists; pass --force to overwrite")
    cfg = ModelConfig.from_dict(read_meta(src)["model"])
    target = hf_target(cfg, approximate_gelu)
    sd, _ = load_consolidated(src)
    if approximate_gelu and cfg.activation == "gelu" and target is hf_openai_gpt:
        log.warning("exporting exact GELU as OpenAIGPT's tanh-approximate GELU (--approximate-gelu): "
                    "outputs will differ slightly from megagpt's")
    tok_path = tokenizer_path_in(src)
    token_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok_path:
        for k, v in special_token_ids(tok_path).items():
            token_ids[k] = v if v is not None and v < cfg.vocab_size else None
    hf_sd = {k: v.to(_DTYPES[dtype]) for k, v in to_hf_state_dict(sd, cfg, target).items()}
    with atomic_dir(out, force) as tmp:
        _write_safetensors(hf_sd, tmp, max_shard_size)
        hf_cfg = target.to_hf_config(cfg, token_ids)
        hf_cfg.dtype = dtype
        hf_cfg.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(tmp))
        if tok_path:
            export_tokenizer(tok_path, tmp, max_length=cfg.max_seq_len)
    log.info("exported %s (%s) to %s", src, target.ARCHITECTURE, out)
    return Path(out)


# ---------------------------------------------------------------------------------- import
def _read_hf_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        sd = {}
        for f in _progress(files, "reading shards"):
            sd.update(load_file(str(d / f)))
        return sd
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MegaGPTError(f"{d}: no model.safetensors(.index.json) or pytorch_model.bin")


def model_config_from_hf(hf_dir) -> tuple:
    """(ModelConfig, name-table module) for an HF dir's config.json; unsupported settings refused."""
    from megagpt.model import ModelConfig

    path = Path(hf_dir) / "config.json"
    c = read_json(path)
    arch = (c.get("architectures") or [None])[0]
    target = ARCHS.get(arch) or _BY_MODEL_TYPE.get(c.get("model_type"))
    if target is None:
        raise MegaGPTError(f"{path}: architecture {arch!r} (model_type {c.get('model_type')!r}) is not importable; "
                           f"supported: {', '.join(ARCHS)}")
    kw, bad = target.from_hf_config(c, str(path))
    if bad:
        raise MegaGPTError(f"{path}: {target.ARCHITECTURE} setting(s) megagpt cannot reproduce: {'; '.join(bad)}")
    kw["name"] = f"hf:{c.get('_name_or_path') or Path(hf_dir).name}"
    return ModelConfig.from_dict(kw), target


def from_hf_state_dict(hf_sd: dict, cfg, target, where: str = "HF checkpoint") -> dict:
    """HF names → our state dict (padded vocab rows zero; tied lm_head restored)."""
    from megagpt.model import GPT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    table = target.names(cfg)
    wanted = {h for _, h, _ in table}
    if cfg.tie_embeddings:   # some writers store the tied head too; it is the embedding
        hf_sd = {k: v for k, v in hf_sd.items() if k != "lm_head.weight"}
    prefix = table[0][1].split(".", 1)[0] + "."   # old hub files may omit "transformer."
    hf_sd = {(k if k in wanted or k.startswith(prefix) else prefix + k): v for k, v in hf_sd.items()}
    unexpected = sorted(k for k in hf_sd if k not in wanted and not k.endswith(_IGNORED_HF_SUFFIXES))
    missing = sorted(wanted - set(hf_sd))
    if missing or unexpected:
        raise MegaGPTError(f"{where}: weights do not match its config.json (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    sd = {}
    for ours, hf, op in _progress(table, "from HF"):
        t = hf_sd[hf].to(torch.float32)
        if op == "T":
            t = t.T
        if op == "vocab" or isinstance(op, tuple):
            full = sd.get(ours)
            if full is None:
                full = sd[ours] = torch.zeros(shapes[ours], dtype=torch.float32)
            a, b = (0, cfg.vocab_size) if op == "vocab" else op[1:]
            if t.shape != full[a:b].shape:
                raise MegaGPTError(f"{where}: {hf} has shape {tuple(t.shape)}, expected {tuple(full[a:b].shape)}")
            full[a:b] = t
            continue
        if t.shape != shapes[ours]:
            raise MegaGPTError(f"{where}: {hf} has shape {tuple(t.shape)}, expected {tuple(shapes[ours])}")
        sd[ours] = t.contiguous()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.tok.weight"]
    if set(sd) != set(shapes):
        raise MegaGPTError(f"{where}: internal name table does not cover {sorted(set(shapes) - set(sd))[:5]}")
    return sd


def hf_to_consolidated(src, out, force: bool = False) -> Path:
    """An HF GPT-2 / OpenAI GPT / Llama dir → a consolidated megagpt checkpoint (to continue training)."""
    src = Path(src)
    if Path(out).exists() and not force:
        raise MegaGPTError(f"{out}: already exists; pass --force to overwrite")
    cfg, target = model_config_from_hf(src)
    sd = from_hf_state_dict(_read_hf_weights(src), cfg, target, str(src))
    with tempfile.TemporaryDirectory() as scratch:
        tok = import_tokenizer(src, Path(scratch) / "tok")
        if tok is None:
            log.warning("%s: no sentencepiece tokenizer.model or GPT-2 vocab.json/merges.txt; "
                        "the consolidated checkpoint will have no tokenizer", src)
        return save_consolidated(out, sd, cfg.to_dict(), tokenizer_path=tok, force=force)


# ---------------------------------------------------------------------------------- load
def load_model(consolidated_dir):
    """A consolidated checkpoint → ``GPT`` with its weights (eval mode, fp32, CPU)."""
    from megagpt.model import GPT, ModelConfig

    sd, meta = load_consolidated(consolidated_dir)
    cfg = ModelConfig.from_dict(meta["model"])
    model = GPT(cfg)
    if cfg.tie_embeddings:  # safetensors keeps both tied names; either alone is enough
        tok = sd.get("embed.tok.weight", sd.get("lm_head.weight"))
        sd = {**sd, "embed.tok.weight": tok, "lm_head.weight": tok}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MegaGPTError(f"{consolidated_dir}: weights do not match config.json "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()


# ---------------------------------------------------------------------------------- dispatch
def detect_format(path) -> str:
    """"deepspeed" (latest / global_stepN), "consolidated" (our config.json) or "hf" (an HF config.json)."""
    from .deepspeed_ckpt import is_deepspeed_checkpoint

    p = Path(path)
    if not p.exists():
        raise MegaGPTError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise MegaGPTError(f"{p}: expected a checkpoint directory")
    if is_deepspeed_checkpoint(p):
        return "deepspeed"
    if (p / "config.json").is_file():
        c = read_json(p / "config.json")
        if c.get("format") == "megagpt-consolidated":
            return "consolidated"
        if "model_type" in c or "architectures" in c:
            return "hf"
    raise MegaGPTError(f"{p}: not a DeepSpeed checkpoint (latest or global_stepN/), a consolidated megagpt "
                       f"checkpoint, nor an HF transformers dir (config.json with model_type)")


def convert(input_path, output_path, to: str, tag: str | None = None, force: bool = False,
            tokenizer: str | None = None, dtype: str = "float32", approximate_gelu: bool = False,
            max_shard_size="5GB") -> Path:
    """Convert between the three formats; ``to`` is "consolidated" (alias "megagpt") or "hf"."""
    from .deepspeed_ckpt import deepspeed_to_consolidated

    src = detect_format(input_path)
    to = "consolidated" if to == "megagpt" else to
    if to not in ("consolidated", "hf"):
        raise MegaGPTError(f"--to {to!r}: must be consolidated, megagpt or hf")
    if tag is not None and src != "deepspeed":
        raise MegaGPTError(f"--tag only applies to DeepSpeed checkpoints; {input_path} is {src}")
    if tokenizer is not None and src != "deepspeed":
        raise MegaGPTError(f"--tokenizer only applies to DeepSpeed checkpoints; {input_path} is {src}")
    if Path(output_path).exists() and not force:   # fail before any (slow) reading
        raise MegaGPTError(f"{output_path}: already exists; pass --force to overwrite")
    if src == to:
        raise MegaGPTError(f"{input_path} is already a {src} checkpoint")
    if src == "deepspeed" and to == "consolidated":
        return deepspeed_to_consolidated(input_path, output_path, tag=tag, force=force, tokenizer_path=tokenizer)
    if src == "deepspeed":   # deepspeed → consolidated (scratch) → hf; refuse before the slow merge
        from .deepspeed_ckpt import _model_config, read_client_state, resolve_tag

        states, where = read_client_state(Path(input_path) / resolve_tag(input_path, tag))
        hf_target(_model_config(states, where), approximate_gelu)
        del states
        with tempfile.TemporaryDirectory(dir=Path(output_path).parent if Path(output_path).parent.exists()
                                         else None) as scratch:
            mid = deepspeed_to_consolidated(input_path, Path(scratch) / "consolidated", tag=tag,
                                            tokenizer_path=tokenizer)
            return consolidated_to_hf(mid, output_path, force=force, dtype=dtype,
                                      approximate_gelu=approximate_gelu, max_shard_size=max_shard_size)
    if src == "consolidated":
        return consolidated_to_hf(input_path, output_path, force=force, dtype=dtype,
                                  approximate_gelu=approximate_gelu, max_shard_size=max_shard_size)
    return hf_to_consolidated(input_path, output_path, force=force)
