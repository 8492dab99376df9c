"""Our tokenizers as HF tokenizer files that ``AutoTokenizer.from_pretrained`` loads with no custom code
(docs/export.md): sentencepiece as a ``tokenizer.json`` spelling out its pipeline (``tokenizer.model``
copied beside it for the way back), GPT-2 BPE under HF's names. Like ours, both spell out a literal
``"<cls>"`` in text (``split_special_tokens=True``) and add no bos/eos on ``encode``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megagpt.errors import MegaGPTError
from megagpt.tokenizer import BOS, CLS, DELIM, EOS, GPT2_EOT, PAD, UNK, load_tokenizer


def _sentencepiece_fast(model_path: str):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    checks = [(ts.model_type != 2, f"model_type={ts.model_type} (only BPE=2 is exported)"),
              (ns.precompiled_charsmap or ns.name not in ("identity", ""),
               f"normalization rule {ns.name!r} (only 'identity' is exported exactly)"),
              (ns.remove_extra_whitespaces, "remove_extra_whitespaces=true")]
    problems = [why for bad, why in checks if bad]
    if problems:
        raise MegaGPTError(f"{model_path}: sentencepiece model cannot be exported faithfully: {'; '.join(problems)}")

    kw = SentencePieceExtractor(model_path).extract(BPE)
    tok = Tokenizer(BPE(kw["vocab"], kw["merges"], unk_token=ts.unk_piece, fuse_unk=True,
                        byte_fallback=ts.byte_fallback, dropout=None))
    norm = [normalizers.Prepend("▁")] if ns.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # control pieces (<pad> <s> </s> <delim> <cls>) and <unk> are never produced from text
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (2, 3)])   # unknown, control
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)  # user-defined: matched in text
                    for p in proto.pieces if p.type == 4])

    vocab = tok.get_vocab()
    present = lambda piece: piece if piece in vocab else None  # noqa: E731
    extra = [t for t in (DELIM, CLS) if t in vocab]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=present(BOS), eos_token=present(EOS), unk_token=present(UNK),
        pad_token=present(PAD), additional_special_tokens=extra, split_special_tokens=True,
        clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False, model_max_length=None)


def _gpt2_fast(ours, dest: Path):
    from transformers import GPT2TokenizerFast

    if "encoder.json" in ours.files:
        shutil.copyfile(Path(ours.path) / "encoder.json", dest / "vocab.json")
        shutil.copyfile(Path(ours.path) / "vocab.bpe", dest / "merges.txt")
    else:   # from a tokenizer.json: its BPE model writes the same two files
        ours.hf.model.save(str(dest))
    return GPT2TokenizerFast.from_pretrained(
        str(dest), bos_token=GPT2_EOT, eos_token=GPT2_EOT, unk_token=GPT2_EOT, pad_token=PAD,
        additional_special_tokens=[DELIM, CLS], split_special_tokens=True,
        add_prefix_space=False, clean_up_tokenization_spaces=False)


def export_tokenizer(tokenizer_path, dest, max_length: int | None = None) -> None:
    """Write HF tokenizer files for our tokenizer (a sentencepiece .model or a GPT-2 BPE dir) into ``dest``."""
    ours = load_tokenizer(tokenizer_path)  # validates the files first
    dest = Path(dest)
    if ours.type == "sentencepiece":
        hf = _sentencepiece_fast(ours.path)
        shutil.copyfile(ours.path, dest / "tokenizer.model")
    else:
        hf = _gpt2_fast(ours, dest)
    if max_length:
        hf.model_max_length = max_length
    hf.save_pretrained(str(dest))
    # transformers 5 keeps specials in tokenizer_config.json only; older readers look here
    specials = {k: getattr(hf, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(hf, k)}
    specials["additional_special_tokens"] = [t for t in (DELIM, CLS) if t in hf.get_vocab()]
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    if len(hf) != ours.vocab_size:
        raise MegaGPTError(f"{tokenizer_path}: exported tokenizer has {len(hf)} tokens, ours {ours.vocab_size}")


def import_tokenizer(hf_dir, dest) -> str | None:
    """Our tokenizer's path from an HF dir (its ``tokenizer.model``, or GPT-2's ``vocab.json`` /
    ``merges.txt`` copied into ``dest`` as ``encoder.json`` / ``vocab.bpe``), or None if it has none."""
    src, dest = Path(hf_dir), Path(dest)
    if (src / "tokenizer.model").is_file():
        return str(src / "tokenizer.model")
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "vocab.json", dest / "encoder.json")
        shutil.copyfile(src / "merges.txt", dest / "vocab.bpe")
        try:
            load_tokenizer(str(dest))
        except MegaGPTError:
            return None  # a byte-level BPE, but not GPT-2's vocabulary: not one of ours
        return str(dest)
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MegaGPTError(f"{path}: cannot read JSON ({e})") from None
