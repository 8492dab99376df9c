"""Tokenizers: train a sentencepiece model with reserved special ids, or load one (or GPT-2 BPE).

Special tokens have FIXED ids in every sentencepiece model trained here, so that checkpoints,
shards and finetune transforms agree without looking anything up: 0 ``<pad>`` (finetune batches
only), 1 ``<unk>`` (rare: byte fallback spells unseen chars as ``<0xNN>``), 2 ``<s>`` (bos),
3 ``</s>`` (eos == eod, after every document), 4 ``<delim>`` (the GPT-1 paper's ``$``), 5 ``<cls>``
(its extract token ``<e>``, whose hidden state feeds the task head). They are *control* symbols
(GPT-2 BPE: ``<|endoftext|>``=50256 and the appended ``<pad> <delim> <cls>``=50257.. are special
tokens): ``encode`` never makes them from text, so user text holding ``"<cls>"`` cannot inject
one; finetune transforms insert them by id. ``decode`` drops them, and identity normalization
with byte fallback makes ``decode(encode(x)) == x`` for any text.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import warnings
import zlib
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from megagpt.atomic import writing
from megagpt.errors import MegaGPTError

PAD, UNK, BOS, EOS, DELIM, CLS = "<pad>", "<unk>", "<s>", "</s>", "<delim>", "<cls>"
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "delim": 4, "cls": 5}
GPT2_EOT = "<|endoftext|>"
GPT2_FILES = ("encoder.json", "vocab.bpe")
HF_TOKENIZER_JSON = "tokenizer.json"   # the same BPE as HF's one-file fast tokenizer (GPT-2's, saved by transformers)

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SKIP_IN_FOLDERS = (".bin", ".idx")
MAX_SENTENCE_BYTES = 4192  # sentencepiece's default max_sentence_length: it drops longer ones silently
UNREADABLE = "unreadable (malformed JSON, missing key, not a string, or invalid UTF-8)"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # from JSON "\\ud800" escapes: no tokenizer accepts them


# ----------------------------------------------------------------------------- input files
def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files, globs or folders (recursive) → a sorted, de-duplicated list of files.

    Each argument expands in sorted order and arguments keep their order, so the document order
    (and hence the output bytes) is reproducible. Folders skip hidden files and token shards
    (.bin/.idx), so re-running with outputs inside an input folder does not read them as text.
    """
    files: list[str] = []
    for arg in map(str, inputs):
        if os.path.isdir(arg):
            found = sorted(str(p) for p in Path(arg).rglob("*")
                           if p.is_file() and not p.name.startswith(".") and p.suffix not in SKIP_IN_FOLDERS)
            if not found:
                raise MegaGPTError(f"{arg}: folder contains no input files")
        elif os.path.isfile(arg):
            found = [arg]
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not found:
                raise MegaGPTError(f"{arg}: pattern matches no files")
        else:
            raise MegaGPTError(f"{arg}: no such file or folder")
        files += found
    return list(dict.fromkeys(files))


def unique_json_keys(keys) -> tuple:
    """``keys`` as a tuple; a key given twice would read (and write) every document twice."""
    keys = tuple(keys)
    twice = [k for i, k in enumerate(keys) if k in keys[:i]]
    if twice:
        raise MegaGPTError(f"--json-keys: {twice[0]!r} is given twice")
    return keys


def is_json_file(path: str) -> bool:
    return str(path).endswith(JSON_SUFFIXES)


def open_binary(path: str):
    try:
        return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise MegaGPTError(f"{path}: cannot open: {e.strerror or e}") from None


def sentence_iterator(inputs: Sequence[str], json_keys=("text",)) -> Iterator[str]:
    """Stream training sentences (non-empty lines) from txt/jsonl(.gz) files, one at a time.

    Unreadable lines (malformed JSON, missing key, bad UTF-8) are skipped here: a tokenizer sample
    does not need every line, and ``preprocess`` is the strict gate. So are the sentences
    sentencepiece would drop anyway. A file's skipped lines are counted in one warning.
    """
    for path in expand_inputs(inputs):
        skipped = Counter()
        try:
            yield from _file_sentences(path, json_keys, skipped)
        except (OSError, EOFError, zlib.error) as e:  # e.g. a truncated .gz
            raise MegaGPTError(f"{path}: read failed: {e}") from None
        if skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
            warnings.warn(f"{path}: {skipped.total()} lines skipped: {reasons}")


def _file_sentences(path, json_keys, skipped):
    as_json = is_json_file(path)
    with open_binary(path) as f:
        for raw in f:
            if as_json and raw.isspace():
                continue
            try:
                line = raw.decode("utf-8")
                texts = [json.loads(line)[k] for k in json_keys] if as_json else [line]
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                skipped[UNREADABLE] += 1
                continue
            for text in texts:
                if not isinstance(text, str) or (b"\\u" in raw and LONE_SURROGATE.search(text)):
                    skipped[UNREADABLE] += 1
                    continue
                for sent in filter(str.strip, text.splitlines()):
                    if len(sent) > MAX_SENTENCE_BYTES // 4 and len(sent.encode()) > MAX_SENTENCE_BYTES:
                        skipped[f"longer than {MAX_SENTENCE_BYTES} bytes"] += 1
                    elif "\u2047" in sent:
                        skipped["containing \u2047 (reserved by sentencepiece)"] += 1
                    else:
                        yield sent


# ----------------------------------------------------------------------------- training
def train_sentencepiece(inputs: list[str], output_prefix: str, vocab_size: int, model_type: str = "bpe",
                        json_keys=("text",), byte_fallback: bool = True, input_sentence_size: int = 0,
                        num_threads: int | None = None, verbose: bool = False) -> str:
    """Train PREFIX.model/.vocab with the reserved specials at ids 0..5; returns the .model path.

    ``input_sentence_size`` > 0 makes sentencepiece keep a random sample of that many sentences
    (reservoir, so memory stays bounded); 0 uses every sentence.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise MegaGPTError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    minimum = len(SPECIAL_IDS) + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise MegaGPTError(f"vocab_size {vocab_size} is too small: the specials"
                           f"{' and 256 byte pieces' if byte_fallback else ''} alone need {minimum - 1}")
    json_keys = unique_json_keys(json_keys)
    files = expand_inputs(inputs)  # fail on missing inputs before sentencepiece starts
    with writing(output_prefix):
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    failure: list[MegaGPTError] = []
    n_sentences = 0

    def sentences():  # sentencepiece turns an iterator's exception into a multi-line RuntimeError
        nonlocal n_sentences
        try:
            for sent in sentence_iterator(files, json_keys):
                n_sentences += 1
                yield sent
        except MegaGPTError as e:
            failure.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(output_prefix), vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            control_symbols=[DELIM, CLS],
            byte_fallback=byte_fallback,
            # identity + keep whitespace: decode(encode(x)) == x, whitespace runs are not lost
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, character_coverage=0.9995 if byte_fallback else 1.0,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        if not n_sentences:
            raise MegaGPTError(f"{', '.join(files)}: no text to train on (empty, blank, or every line "
                               f"skipped)") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MegaGPTError(f"sentencepiece training on {', '.join(files)} failed: {msg}") from None
    return str(output_prefix) + ".model"


# ----------------------------------------------------------------------------- wrapper
class Tokenizer:
    """Common interface over sentencepiece and GPT-2 BPE (see docs/architecture.md).

    Picklable: the state is the path, and unpickling re-loads it (cheap: a few ms for
    sentencepiece), so multiprocessing workers can receive a Tokenizer directly.
    """

    type: str
    path: str
    vocab_size: int
    pad_id = unk_id = bos_id = eos_id = delim_id = cls_id = None  # int ids, None where the model lacks one

    @property
    def eod_id(self) -> int | None:
        return self.eos_id

    def spec(self) -> dict:
        return {"type": self.type, "path": self.path}

    def fingerprint(self) -> str:
        """sha256 of the files that define the ids (the .model, or encoder.json + vocab.bpe, or tokenizer.json): two
        tokenizers of the same vocabulary size still differ here, so a shard can say which made it."""
        files = [self.path] if self.type == "sentencepiece" else [os.path.join(self.path, f) for f in self.files]
        return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: list[str], eod: int | None, dtype):
        """(all documents' ids, each followed by ``eod`` unless None, as one ``dtype`` array;
        int64 array of per-document lengths): what a shard writer takes, without a list per document."""
        import numpy as np

        ids = self.encode_batch(texts) if texts else []
        if eod is not None:
            for x in ids:
                x.append(eod)
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(sizes.sum())), sizes

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__dict__.update(load_tokenizer(state["path"]).__dict__)

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    type = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise MegaGPTError(f"{self.path}: not a valid sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()

        def piece_id(piece):  # None when a foreign model lacks the piece
            i = self.sp.piece_to_id(piece)
            return i if self.sp.id_to_piece(i) == piece else None

        self.pad_id, self.unk_id = piece_id(PAD), self.sp.unk_id()
        self.bos_id, self.eos_id = piece_id(BOS), piece_id(EOS)
        self.delim_id, self.cls_id = piece_id(DELIM), piece_id(CLS)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        # num_threads=1: parallelism comes from processes (preprocess workers), not oversubscription
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE via HF ``tokenizers``, from ``encoder.json`` + ``vocab.bpe`` or, in a
    folder without them, from HF's ``tokenizer.json`` (only its BPE model is taken: the
    pre-tokenizer, specials and decoder are GPT-2's, set here, so both give the same ids)."""

    type = "gpt2-bpe"

    def __init__(self, path: str):
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        self.path = str(path)
        self.files = gpt2_files(self.path)   # the files that define the ids
        try:
            if self.files == GPT2_FILES:
                bpe = models.BPE.from_file(*(os.path.join(self.path, f) for f in GPT2_FILES))
            else:
                bpe = HFTokenizer.from_file(os.path.join(self.path, HF_TOKENIZER_JSON)).model
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise MegaGPTError(f"{self.path}: cannot load GPT-2 BPE from {' + '.join(self.files)} ({e})") from None
        if not isinstance(bpe, models.BPE):
            raise MegaGPTError(f"{self.path}/{HF_TOKENIZER_JSON}: a {type(bpe).__name__} model, not GPT-2's "
                               f"byte-level BPE")
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (GPT2_EOT, PAD, DELIM, CLS)])
        tok.encode_special_tokens = True  # literal "<|endoftext|>" in user text stays text
        self.hf = tok
        ids = {t: tok.token_to_id(t) for t in (GPT2_EOT, PAD, DELIM, CLS)}
        if ids[GPT2_EOT] != 50256 or ids[PAD] != 50257:
            raise MegaGPTError(f"{self.path}: {self.files[0]} is not GPT-2's 50257-token vocabulary "
                               f"({GPT2_EOT} has id {ids[GPT2_EOT]}, expected 50256)")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = ids[GPT2_EOT]
        self.pad_id, self.delim_id, self.cls_id = ids[PAD], ids[DELIM], ids[CLS]
        self.unk_id = None  # byte-level: every string is representable
        # the BPE of one pre-split word: byte map (no regex) + merges; encode_flat caches its results
        self._bpe = HFTokenizer(bpe)  # the same model object: loaded once
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._word_ids: dict[str, bytes] = {}  # word -> its ids as uint16 bytes
        _compile_splitters()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same ids as ``encode_batch_hf`` (HF ``tokenizers`` end to end), 2-3x faster; see ``encode_flat``."""
        import numpy as np

        flat, sizes = self.encode_flat(texts, None, np.uint16)
        return [x.tolist() for x in np.split(flat, np.cumsum(sizes)[:-1])] if len(sizes) else []

    def encode_flat(self, texts: list[str], eod: int | None, dtype):
        """The ids of ``self.hf.encode_batch`` (the reference path, ``encode_batch_hf``), byte for byte,
        2-3x faster. GPT-2's split regex runs in Python (``re`` for ASCII text, ``regex`` otherwise,
        both C), each distinct word is BPE-merged once by ``tokenizers`` and cached as uint16 bytes,
        and a document is the join of its words' bytes. HF's per-token work (byte->char alignments,
        offsets, token strings, an ``Encoding`` per document) is what this skips. A document with a
        character unknown to Python's ``unicodedata`` goes through ``self.hf``: there the two regex
        engines' Unicode tables may differ (see ``_unverified``)."""
        import numpy as np

        if np.dtype(dtype) != np.uint16:  # GPT-2's 50261 ids always fit
            return super().encode_flat(texts, eod, dtype)
        texts = list(texts)
        unverified = iter(_unverified([t for t in texts if not t.isascii()]))
        words = [_ASCII_SPLIT(t) if t.isascii() else None if next(unverified) else _GPT2_SPLIT(t) for t in texts]
        cache = self._word_ids
        new = set(chain.from_iterable(w for w in words if w is not None)).difference(cache)
        if new:
            if len(cache) + len(new) > WORD_CACHE_SIZE:  # bounded memory; ids do not depend on the cache
                cache.clear()
            new = list(new)
            for word, enc in zip(new, self._bpe.encode_batch_fast(new, add_special_tokens=False)):
                cache[word] = np.array(enc.ids, dtype=np.uint16).tobytes()
        get = cache.__getitem__
        docs = [b"".join(map(get, w)) if w is not None else None for w in words]
        fallback = [t for t, w in zip(texts, words) if w is None]
        if fallback:
            done = iter(self.encode_batch_hf(fallback))
            docs = [np.array(next(done), dtype=np.uint16).tobytes() if d is None else d for d in docs]
        if eod is not None:
            end = np.array([eod], dtype=np.uint16).tobytes()
            docs = [d + end for d in docs]
        sizes = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) // 2
        return np.frombuffer(b"".join(docs), dtype=np.uint16), sizes

    def encode_batch_hf(self, texts: list[str]) -> list[list[int]]:
        """The reference path: HF ``tokenizers`` end to end (split, byte map, BPE) per document."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


# GPT-2's pre-tokenizer regex (the one HF's ByteLevel pre-tokenizer and the original encoder.py use)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_CACHE_SIZE = 1 << 20  # distinct words cached per process (~150 MB at most)
_GPT2_SPLIT = _ASCII_SPLIT = None  # findall of the compiled patterns, set by the first GPT2BPETokenizer
_UNVERIFIED_TABLE = None


def _compile_splitters():
    """GPT2_SPLIT_PATTERN in ``regex`` (which has ``\\p{L}``), and for ASCII text the same pattern in
    stdlib ``re`` (2x faster) with ``\\p{L}``, ``\\p{N}``, ``\\s`` spelt as the ASCII characters
    ``regex`` itself puts in them, so the two agree by construction."""
    global _GPT2_SPLIT, _ASCII_SPLIT
    if _GPT2_SPLIT is not None:
        return
    import regex

    ascii_chars = [chr(c) for c in range(128)]

    def ascii_class(prop):
        return "".join(re.escape(c) for c in ascii_chars if regex.fullmatch(prop, c))

    letter, number, space = ascii_class(r"\p{L}"), ascii_class(r"\p{N}"), ascii_class(r"\s")
    _ASCII_SPLIT = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letter}]+| ?[{number}]+| ?[^{space}{letter}{number}]+"""
                              rf"""|[{space}]+(?![^{space}])|[{space}]+""").findall
    _GPT2_SPLIT = regex.compile(GPT2_SPLIT_PATTERN).findall


def _unverified(texts: list[str]) -> list[bool]:
    """Per text: does it hold a code point Python's ``unicodedata`` calls unassigned (or a surrogate)?

    Such a character may be a letter in one regex engine's Unicode tables and not in the other's
    (e.g. Unicode 17 scripts: ``regex`` knows them, the Oniguruma inside ``tokenizers`` may not),
    which changes where GPT-2's split falls. Both engines agree on every character assigned in
    ``unicodedata``'s version (tests/test_bpe_speed.py checks all of them), so only these texts
    need HF's own split. A numpy lookup over UTF-32 code points: ~1 ns per character."""
    global _UNVERIFIED_TABLE
    if not texts:
        return []
    if _UNVERIFIED_TABLE is None:
        import unicodedata

        import numpy as np

        table = np.ones(0x110000, dtype=bool)  # planes 4-13 are unassigned in every Unicode so far
        for lo, hi in ((0, 0x40000), (0xE0000, 0x110000)):
            table[lo:hi] = np.frombuffer(bytes(unicodedata.category(chr(c)) in ("Cn", "Cs") for c in range(lo, hi)),
                                         dtype=bool)
        _UNVERIFIED_TABLE = table
    import numpy as np

    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    seen = np.concatenate(([0], np.cumsum(_UNVERIFIED_TABLE[cps], dtype=np.int64)))
    ends = np.cumsum([len(t) for t in texts])
    return (seen[ends] > seen[ends - [len(t) for t in texts]]).tolist()


def gpt2_files(folder) -> tuple:
    """The files of a GPT-2 BPE folder that define its ids: ``encoder.json`` + ``vocab.bpe`` when it
    has them, else ``tokenizer.json``."""
    if all(os.path.isfile(os.path.join(folder, f)) for f in GPT2_FILES):
        return GPT2_FILES
    return (HF_TOKENIZER_JSON,)


def load_tokenizer(path) -> Tokenizer:
    """A sentencepiece ``.model`` file, or a folder holding GPT-2's ``encoder.json`` + ``vocab.bpe``
    (or HF's ``tokenizer.json`` of the same BPE)."""
    path = str(path)
    if os.path.isdir(path):
        missing = [f for f in GPT2_FILES if not os.path.isfile(os.path.join(path, f))]
        if missing and not os.path.isfile(os.path.join(path, HF_TOKENIZER_JSON)):
            raise MegaGPTError(f"{path}: tokenizer folder lacks {' and '.join(missing)} "
                               f"(expected GPT-2 encoder.json + vocab.bpe, or {HF_TOKENIZER_JSON}, "
                               f"or pass a sentencepiece .model)")
        return GPT2BPETokenizer(path)
    if not os.path.isfile(path):
        raise MegaGPTError(f"{path}: tokenizer not found (expected a sentencepiece .model file or a "
                           f"folder with GPT-2 encoder.json + vocab.bpe or tokenizer.json)")
    return SentencePieceTokenizer(path)
