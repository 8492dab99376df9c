"""Full megagpt state dicts ⇄ HF transformers directories (weights, config, tokenizer files).

Export picks the one HF architecture that computes exactly what the model computes (``hf_target``)
and refuses, naming every offending field, what it cannot express. Both directions read the same
name table of ``(ours, hf, op)`` entries, so they are inverses; op is ``"copy"``, ``"T"`` (Conv1D
transpose), ``"vocab"`` (padded rows dropped on export, zero on import) or ``("rows", a, b)``
(Llama's q/k/v slices of our fused qkv).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megagpt.atomic import atomic_dir
from megagpt.errors import MegaGPTError

from . import hf_gpt2, hf_llama, hf_openai_gpt
from .hf_tokenizer import export_tokenizer, read_json

log = logging.getLogger("megagpt.export")

ARCHS = {m.ARCHITECTURE: m for m in (hf_gpt2, hf_openai_gpt, hf_llama)}
_BY_MODEL_TYPE = {m.MODEL_TYPE: m for m in (hf_gpt2, hf_openai_gpt, hf_llama)}
# HF buffers (not parameters) that older checkpoints carry; they hold no trained state
_IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(items, desc):
    from tqdm.auto import tqdm

    quiet = not log.isEnabledFor(logging.INFO)   # --quiet: no bars; otherwise on a terminal only
    return tqdm(items, desc=desc, unit="tensor", leave=False, disable=True if quiet else None)


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
        raise MegaGPTError(f"model {cfg.name!r} has no faithful HF transformers equivalent (nearest: "
                           f"{target.ARCHITECTURE}); offending field(s): {'; '.join(bad)}")
    return target


def _rows(op, cfg):
    """The rows of our tensor that a "vocab" or ("rows", a, b) entry maps, else None."""
    return (0, cfg.vocab_size) if op == "vocab" else op[1:] if isinstance(op, tuple) else None


def to_hf_state_dict(sd: dict, cfg, target) -> dict:
    """Our state dict (padded vocab) → HF names and layouts of ``target`` (``hf_target(cfg)``)."""
    out = {}
    for ours, hf, op in _progress(target.names(cfg), "to HF"):
        if ours not in sd:
            raise MegaGPTError(f"checkpoint lacks {ours!r}, which model config {cfg.name!r} has")
        t, rows = sd[ours], _rows(op, cfg)
        out[hf] = (t.T if op == "T" else t[rows[0]:rows[1]] if rows else t).contiguous()
    return out


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """One safetensors file, created by a plain open() (so with the umask's permissions: safetensors'
    own ``save_file`` makes 0600 files). Tied names sharing storage are stored as separate copies."""
    from safetensors.torch import save

    seen, own = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        own[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    Path(path).write_bytes(save(own, metadata=metadata))


def _write_safetensors(tensors: dict, dest: Path, max_shard_size) -> None:
    """model.safetensors, or HF-style shards + model.safetensors.index.json when larger."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in _progress(list(split.filename_to_tensors.items()), "writing shards"):
        write_safetensors({n: tensors[n] for n in names}, dest / filename, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf(out, state_dict: dict, cfg, tokenizer_path=None, force: bool = False, dtype: str = "float32",
             approximate_gelu: bool = False, max_shard_size="5GB") -> Path:
    """A full megagpt state dict (serial names, padded vocab) → an HF transformers dir: weights,
    config.json, generation_config.json and, given ``tokenizer_path``, the tokenizer files."""
    from transformers import GenerationConfig

    from megagpt.tokenizer import load_tokenizer

    if dtype not in _DTYPES:
        raise MegaGPTError(f"dtype {dtype!r} must be one of {', '.join(_DTYPES)}")
    target = hf_target(cfg, approximate_gelu)
    if approximate_gelu and cfg.activation == "gelu" and target is hf_openai_gpt:
        log.warning("exporting exact GELU as OpenAIGPT's tanh-approximate GELU (--approximate-gelu): "
                    "outputs will differ slightly from megagpt's")
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    ids = {f"{k}_token_id": getattr(tok, f"{k}_id", None) for k in ("bos", "eos", "pad")}
    token_ids = {k: v if v is not None and v < cfg.vocab_size else None for k, v in ids.items()}
    hf_sd = {k: v.to(_DTYPES[dtype]) for k, v in to_hf_state_dict(state_dict, cfg, target).items()}
    with atomic_dir(out, force) as tmp:
        _write_safetensors(hf_sd, tmp, max_shard_size)
        hf_cfg = target.to_hf_config(cfg, token_ids)
        hf_cfg.dtype = dtype
        hf_cfg.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(tmp))
        if tokenizer_path:
            export_tokenizer(tokenizer_path, tmp, max_length=cfg.max_seq_len)
    return Path(out)


# ---------------------------------------------------------------------------------- import
def _read_hf_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for f in _progress(shards, "reading shards") for k, v in load_file(str(d / f)).items()}
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
    kw, bad = target.from_hf_config(c)
    if bad:
        raise MegaGPTError(f"{path}: {target.ARCHITECTURE} setting(s) megagpt cannot reproduce: {'; '.join(bad)}")
    kw["name"] = f"hf:{c.get('_name_or_path') or Path(hf_dir).name}"
    return ModelConfig.from_dict(kw), target


def read_hf_weights(hf_dir, cfg, target) -> dict:
    """An HF dir's weights in our names (``model_config_from_hf`` gives ``cfg`` and ``target``):
    padded vocab rows zero, a tied head under the embedding's name only."""
    from megagpt.model.gpt import full_shapes

    hf_sd, where, shapes = _read_hf_weights(Path(hf_dir)), str(hf_dir), full_shapes(cfg)
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
        t, rows = hf_sd[hf].to(torch.float32), _rows(op, cfg)
        t = t.T if op == "T" else t
        want = (rows[1] - rows[0], *shapes[ours][1:]) if rows else shapes[ours]
        if tuple(t.shape) != want:
            raise MegaGPTError(f"{where}: {hf} has shape {tuple(t.shape)}, expected {want}")
        if rows:   # a slice of one of our tensors (rows no entry maps, the padded vocab, stay zero)
            if ours not in sd:
                sd[ours] = torch.zeros(shapes[ours], dtype=torch.float32)
            sd[ours][rows[0]:rows[1]] = t
        else:
            sd[ours] = t.contiguous()
    return sd


def is_hf_dir(path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and not {"model_type", "architectures"}.isdisjoint(read_json(cfg))
