"""Megatron-compatible memory-mapped token shards: ``PREFIX.bin`` + ``PREFIX.idx`` (MMIDIDX v1).

``.idx`` layout (little-endian): magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code,
``<Q`` N sequences, ``<Q`` D = len(doc_idx), then int32 sizes[N], int64 byte pointers[N]
(exclusive prefix sum of size * itemsize), int64 doc_idx[D] (0 ... N). ``.bin`` is the token
arrays back to back. megatron-core's ``IndexedDataset`` reads exactly these bytes.

The reader maps both files (zero-copy: memory does not grow with the corpus) and checks all it
can cheaply, so a truncated or foreign file fails here, named, rather than deep inside training.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from megagpt.atomic import AtomicFile
from megagpt.errors import MegaGPTError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
# Megatron's dtype codes; only uint16 and int32 are written by megagpt, all are readable.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits comfortably (Megatron's rule: vocab < 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix) -> str:
    return f"{prefix}.bin"


def idx_path(prefix) -> str:
    return f"{prefix}.idx"


def meta_path(prefix) -> str:
    """``PREFIX.meta.json``: which tokenizer made the shard (Megatron readers ignore it)."""
    return f"{prefix}.meta.json"


def shard_meta(tok) -> dict:
    return {"format": "megagpt-shard", "version": 1, "tokenizer": {"type": tok.type, "path": tok.path,
            "vocab_size": tok.vocab_size, "sha256": tok.fingerprint()}}


def read_meta(prefix) -> dict | None:
    """The shard's metadata, or None for a shard made elsewhere (megatron, older megagpt)."""
    try:
        with open(meta_path(prefix)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MegaGPTError(f"{meta_path(prefix)}: unreadable shard metadata ({e})") from None


def check_tokenizer(prefix, tok) -> None:
    """Refuse a shard whose metadata names another tokenizer than ``tok`` — same vocabulary size
    or not, its ids would mean other pieces and the run would train on garbage."""
    meta = read_meta(prefix)
    made = (meta or {}).get("tokenizer", {})
    if meta is not None and made.get("sha256") != tok.fingerprint():
        raise MegaGPTError(f"{meta_path(prefix)}: shard made with tokenizer {made.get('path')} "
                           f"(sha256 {str(made.get('sha256'))[:12]}), not {tok.path} "
                           f"(sha256 {tok.fingerprint()[:12]}); pass the tokenizer the shards were made with")


class IndexedDatasetWriter:
    """Streams documents to ``PREFIX.bin``/``.idx`` under temporary names; ``finalize`` renames.
    Nothing at ``PREFIX`` changes before, so an interrupted run never leaves a shard that looks
    complete. As a context manager, an exception discards the temp files."""

    def __init__(self, prefix, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise MegaGPTError(f"unsupported token dtype {self.dtype} for {self.prefix}")
        self._bin_out = AtomicFile(bin_path(self.prefix))  # a hidden temp file until finalize
        self._bin = self._bin_out.file
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        """Append one document (one sequence, then a document boundary)."""
        self.add_item(tokens)
        self.end_document()

    def add_item(self, tokens) -> None:
        src = np.asarray(tokens)
        if src.size and src.dtype != self.dtype and src.dtype.kind in "iu":
            # astype would wrap silently (70000 -> 4464 in uint16): refuse instead
            info = np.iinfo(self.dtype)
            lo, hi = int(src.min()), int(src.max())
            if lo < info.min or hi > info.max:
                raise MegaGPTError(f"{self.prefix}: token id {hi if hi > info.max else lo} does not fit the "
                                   f"shard dtype {self.dtype}; use dtype_for_vocab(vocab_size)")
        arr = np.asarray(src, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, sizes) -> None:
        """Append many one-sequence documents (``tokens`` concatenated in this shard's dtype, ``sizes``
        their lengths) in one write: preprocessing's bulk path, ``add_document`` per item is too slow."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            raise MegaGPTError(f"{self.prefix}: add_documents needs {self.dtype} tokens, got {tokens.dtype}")
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != tokens.size or (sizes.size and int(sizes.min()) < 0):
            raise MegaGPTError(f"{self.prefix}: document sizes sum to {int(sizes.sum())} but {tokens.size} tokens "
                               f"were given")
        self._bin.write(np.ascontiguousarray(tokens).tobytes())
        first = len(self._sizes)
        self._sizes.extend(sizes.tolist())
        self._doc_idx.extend(range(first + 1, first + len(sizes) + 1))
        self.num_tokens += int(tokens.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_index(self, other_prefix) -> None:
        """Append a whole existing shard (its tokens, sizes and document boundaries)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise MegaGPTError(f"{other_prefix}: dtype {other.dtype} differs from {self.dtype} of {self.prefix}")
        offset = len(self._sizes)
        self._sizes.extend(other.sizes.tolist())
        self._doc_idx.extend((other.doc_idx[1:] + offset).tolist())
        self.num_tokens += int(other.sizes.sum())
        with open(bin_path(other_prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self) -> None:
        """Write the index, then publish ``.bin`` and ``.idx`` (each fsynced and renamed)."""
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = (np.cumsum(sizes, dtype=np.int64) - sizes) * self.dtype.itemsize   # exclusive prefix sum
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        idx = AtomicFile(idx_path(self.prefix))
        try:
            idx.file.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], len(sizes), len(doc_idx)))
            for arr in (sizes, pointers, doc_idx):
                idx.file.write(arr.tobytes(order="C"))
            self._bin_out.commit()  # .bin first: an .idx never describes a .bin that is not there
            idx.commit()
        except BaseException:
            idx.discard()
            raise

    def abort(self) -> None:
        self._bin_out.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of one ``PREFIX.bin``/``.idx`` pair: ``ds[i]`` is sequence i
    (a view, no copy); ``doc_idx`` maps documents to sequence ranges (megagpt writes one each)."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise MegaGPTError(f"{p}: no such file (expected a .bin/.idx pair at prefix {self.prefix})")
        idx_len = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
            raise MegaGPTError(f"{ipath}: not a Megatron MMIDIDX index (bad magic or truncated header)")
        version, code, n, d = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise MegaGPTError(f"{ipath}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise MegaGPTError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_SIZE + n * 4 + n * 8 + d * 8
        if idx_len != expected:
            raise MegaGPTError(f"{ipath}: file is {idx_len} bytes but its header (N={n} sequences, D={d} doc "
                               f"entries) needs {expected}; the index is truncated or corrupt")
        self._idx_mmap = m = np.memmap(ipath, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(m, dtype=np.int32, count=n, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(m, dtype=np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.doc_idx = np.frombuffer(m, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * n)
        # pointers are the byte offsets of the sizes before each sequence: a corrupted entry in
        # either (header intact) would otherwise read wrong tokens silently
        expect = (np.cumsum(self.sizes, dtype=np.int64) - self.sizes) * self.dtype.itemsize
        bad = np.flatnonzero((self.sizes < 0) | (self.pointers != expect))
        if bad.size:
            i = int(bad[0])
            raise MegaGPTError(f"{ipath}: sequence {i} has size {self.sizes[i]} and byte pointer {self.pointers[i]}, "
                               f"inconsistent with the sizes before it; the index is corrupt")
        bin_len = os.path.getsize(bpath)
        total = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_len != total:
            raise MegaGPTError(f"{bpath}: file is {bin_len} bytes but {ipath} describes {total} bytes of tokens; "
                               f"the pair does not match (truncated, or from different runs)")
        if d == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n:
            raise MegaGPTError(f"{ipath}: doc_idx must start at 0 and end at N={n}")
        # all tokens of the shard as one flat memory-mapped array
        self.tokens = np.memmap(bpath, mode="r", dtype=self.dtype) if bin_len else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start: start + int(self.sizes[i])]

    def check_token_range(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Raise naming this shard if any token id is >= vocab_size (or negative)."""
        for s in range(0, len(self.tokens), chunk):
            part = self.tokens[s: s + chunk]
            hi, lo = int(part.max()), int(part.min())
            if hi >= vocab_size or lo < 0:
                bad = hi if hi >= vocab_size else lo
                pos = s + int(np.argmax(part == bad))
                raise MegaGPTError(
                    f"{bin_path(self.prefix)}: token id {bad} at token offset {pos} is outside the "
                    f"tokenizer's vocabulary (size {vocab_size}); was this shard made with another tokenizer?")
