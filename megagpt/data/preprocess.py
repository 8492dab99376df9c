"""Text → Megatron token shards, streamed, in parallel, byte-identical for any worker count.

The main process reads the inputs as chunks of raw lines / paragraphs / files (``read_chunks``),
worker processes decode, parse and batch-encode each chunk (``encode_chunk``), and the main
process writes the results *in input order*. At most ``2 * workers + 2`` chunks are in flight,
so memory does not grow with the corpus; a document is always one item, so chunk boundaries
never change the output.

Outputs, one set per json key (txt inputs use key ``text``): ``{output_prefix}_{key}_document``
``.bin/.idx``, or with ``shard_size_tokens`` > 0 ``..._document_00000``, ``_00001``, ... (a new
shard once one holds >= shard_size_tokens tokens; documents are never split). They are
finalized under hidden ``.NAME.partial-PID-RANDOM`` names and published only once the whole
run succeeded; any error removes them.

Documents: one per jsonl line (per key); one per txt file, or with ``split_paragraphs`` one per
blank-line-separated paragraph (its lines, joined by their newlines, without the trailing one).
A document whose text is empty or only whitespace is skipped and counted; an input file that gives
no document is named in a warning, and inputs that give none at all are refused. A bad line
(malformed JSON, not an object, missing key, non-string value, invalid UTF-8) raises a MegaGPTError
naming ``file:line`` or, with ``skip_bad_lines``, is skipped (all keys of that line) and counted.
"""
from __future__ import annotations

import gc
import glob
import json
import multiprocessing as mp
import os
import time
import warnings
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from megagpt.atomic import publish, temp_sibling, write_text_atomic, writing
from megagpt.data.indexed import IndexedDatasetWriter, bin_path, dtype_for_vocab, idx_path, meta_path, shard_meta
from megagpt.errors import MegaGPTError
from megagpt.tokenizer import (LONE_SURROGATE, expand_inputs, is_json_file, load_tokenizer, open_binary,
                               unique_json_keys)

CHUNK_BYTES = 1 << 18
CHUNK_ITEMS = 2048


@dataclass
class Summary:
    docs: int = 0
    tokens: int = 0
    empty_docs: int = 0
    bad_lines: int = 0
    bytes: int = 0
    seconds: float = 0.0
    output_prefixes: list[str] = field(default_factory=list)

    def __str__(self):
        s = max(self.seconds, 1e-9)
        return (f"{self.docs} docs, {self.tokens} tokens, {self.empty_docs} empty docs skipped, "
                f"{self.bad_lines} bad lines skipped, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.docs / s:.0f} docs/s, {self.bytes / 1e6 / s:.2f} MB/s, {self.tokens / s:.0f} tokens/s)")


@dataclass
class Chunk:
    path: str
    is_json: bool
    items: list  # [(first line number, raw bytes)]: jsonl blocks of whole lines, or txt documents


@dataclass
class Encoded:
    path: str
    tokens: dict     # key -> flat np array of all docs' tokens (eod included)
    sizes: dict      # key -> np.int64 array of per-doc lengths
    empty: int
    errors: list     # [(line, message)]


# ----------------------------------------------------------------------------- reading
def read_chunks(files, split_paragraphs=False, chunk_bytes=CHUNK_BYTES, chunk_items=CHUNK_ITEMS):
    """Yield Chunks of raw items. jsonl: one item per ~chunk_bytes block of whole lines (workers
    split it, so the reader does no per-line work); txt: paragraphs or whole files."""
    for path in files:
        try:
            if is_json_file(path):
                for item in _read_line_blocks(path, chunk_bytes):
                    yield Chunk(path, True, [item])
                continue
            pending, size = [], 0
            for item in _read_text_items(path, split_paragraphs):
                pending.append(item)
                size += len(item[1])
                if size >= chunk_bytes or len(pending) >= chunk_items:
                    yield Chunk(path, False, pending)
                    pending, size = [], 0
            if pending:  # a chunk never spans files, so errors name the right file
                yield Chunk(path, False, pending)
        except (OSError, EOFError, zlib.error) as e:
            raise MegaGPTError(f"{path}: read failed: {e}") from None


def _read_line_blocks(path, block_bytes):
    """(first line number, bytes ending at a line end) blocks of about ``block_bytes``."""
    with open_binary(path) as f:
        lineno, rest = 1, b""
        while buf := f.read(block_bytes):
            buf = rest + buf
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                rest = buf
                continue
            block, rest = buf[:cut], buf[cut:]
            yield lineno, block
            lineno += block.count(b"\n")
        if rest:
            yield lineno, rest


def _read_text_items(path, split_paragraphs):
    with open_binary(path) as f:
        if not split_paragraphs:
            yield 1, f.read()
            return
        for blank, para in groupby(enumerate(f, 1), key=lambda numbered: not numbered[1].strip()):
            if not blank:
                para = list(para)
                yield para[0][0], b"".join(raw for _, raw in para).removesuffix(b"\n")


# ----------------------------------------------------------------------------- encoding (workers)
_TOK = None
_CFG = None
_SCAN = json.JSONDecoder().scan_once


def _init_worker(tokenizer_path, json_keys, append_eod, in_pool=False, tok=None):
    global _TOK, _CFG
    if in_pool:  # parallelism comes from the worker processes; HF tokenizers' own threads would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # the heap inherited by fork (torch & co, ~1e6 objects) leaves the cyclic GC's scans: full
        # collections no longer re-traverse it nor dirty its pages (~20% of a worker's encode CPU)
        gc.freeze()
    _TOK = tok if tok is not None else load_tokenizer(tokenizer_path)  # workers=1: the caller's, not a 2nd load
    _CFG = (tuple(json_keys), append_eod, dtype_for_vocab(_TOK.vocab_size))


def _parse(raw, start, is_json, keys):
    """Raw item → list of texts (one per key); raises ValueError(line, message)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = start + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(line, f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {col})") from None
    if not is_json:
        return [text]
    try:  # json's C scanner directly: same grammar as json.loads, without its per-call Python layers
        obj, end = _SCAN(text, 0)
        if end != len(text) and text[end:].strip(" \t\r\n"):
            raise ValueError
    except (StopIteration, ValueError):
        try:  # slow path: leading whitespace, or an error whose exact message we want
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(start, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(start, f"JSON line is a {type(obj).__name__}, expected an object")
    texts = []
    for k in keys:
        if k not in obj:
            present = ", ".join(repr(x) for x in list(obj)[:8])
            raise ValueError(start, f"missing key {k!r} (keys present: {present or 'none'})")
        if not isinstance(obj[k], str):
            raise ValueError(start, f"key {k!r} holds a {type(obj[k]).__name__}, expected a string")
        texts.append(obj[k])
    if b"\\u" in raw:  # only a \u escape can make a lone surrogate
        for k, t in zip(keys, texts):
            if bad := LONE_SURROGATE.search(t):
                raise ValueError(start, f"key {k!r} holds an unpaired surrogate escape "
                                        f"(\\u{ord(bad.group()):04x}), which is not valid text")
    return texts


def _split_items(chunk):
    if not chunk.is_json:
        yield from chunk.items
        return
    for start, block in chunk.items:
        for i, line in enumerate(block.split(b"\n")):
            if line and not line.isspace():
                yield start + i, line


def encode_chunk(chunk: Chunk) -> Encoded:
    keys, append_eod, dtype = _CFG
    per_key = {k: [] for k in keys}
    empty, errors = 0, []
    for start, raw in _split_items(chunk):
        try:
            texts = _parse(raw, start, chunk.is_json, keys)
        except ValueError as e:
            errors.append(e.args)
            continue
        for k, t in zip(keys, texts):
            if t and not t.isspace():  # isspace stops at the first visible char
                per_key[k].append(t)
            else:
                empty += 1
    tokens, sizes = {}, {}
    for k, texts in per_key.items():
        tokens[k], sizes[k] = _TOK.encode_flat(texts, _TOK.eod_id if append_eod else None, dtype)
    return Encoded(chunk.path, tokens, sizes, empty, errors)


# ----------------------------------------------------------------------------- writing
class ShardedOutput:
    """Writes one key's documents, rolling to a new shard every ``shard_size_tokens`` tokens."""

    def __init__(self, base: str, dtype, shard_size_tokens: int, meta: dict):
        self.base, self.dtype, self.shard_size, self.meta = base, dtype, shard_size_tokens, meta
        self.staged: list[tuple[str, str]] = []  # (partial prefix, final prefix) of finalized shards
        self.writer = None

    def _open(self):
        final = f"{self.base}_{len(self.staged):05d}" if self.shard_size else self.base
        self.writer = IndexedDatasetWriter(temp_sibling(final, "partial"), self.dtype)
        self.final = final

    def add(self, flat: np.ndarray, sizes: np.ndarray):
        """Append a chunk's documents, in bulk up to each shard boundary."""
        ends = np.cumsum(sizes)
        doc, pos = 0, 0
        with writing(self.base):
            while doc < len(sizes):
                if self.writer is None:
                    self._open()
                stop = len(sizes)
                if self.shard_size:  # the shard is full after the first doc whose end reaches `room`
                    room = pos + self.shard_size - self.writer.num_tokens
                    stop = min(int(np.searchsorted(ends, room, side="left")) + 1, stop)
                end = int(ends[stop - 1])
                self.writer.add_documents(flat[pos:end], sizes[doc:stop])
                doc, pos = stop, end
                if self.shard_size and self.writer.num_tokens >= self.shard_size:
                    self._close()

    def _close(self):
        self.writer.finalize()
        self.staged.append((self.writer.prefix, self.final))
        self.writer = None

    def commit(self) -> list[str]:
        with writing(self.base):
            if self.writer is not None or not self.staged:  # a key without documents still gets an (empty) shard
                if self.writer is None:
                    self._open()
                self._close()
            for partial, final in self.staged:   # the metadata first: no shard is ever without it
                write_text_atomic(meta_path(final), json.dumps(self.meta, indent=1))
                publish(bin_path(partial), bin_path(final))
                publish(idx_path(partial), idx_path(final))
        return [final for _, final in self.staged]

    def abort(self):
        if self.writer is not None:
            self.writer.abort()
        for partial, _ in self.staged:
            for p in (bin_path(partial), idx_path(partial)):
                if os.path.exists(p):
                    os.remove(p)


# ----------------------------------------------------------------------------- driver
def existing_outputs(output_prefix, json_keys) -> list:
    """Shard files already at this output prefix (one per key, or numbered ones), with metadata."""
    found = []
    for key in json_keys:
        base = f"{output_prefix}_{key}_document"
        for ext in (".bin", ".idx", ".meta.json"):
            found += [base + ext] if os.path.lexists(base + ext) else []
            found += sorted(glob.glob(glob.escape(base) + "_[0-9][0-9][0-9][0-9][0-9]" + ext))
    return found


def preprocess(inputs, output_prefix, tokenizer_path, json_keys=("text",), workers=1, append_eod=True,
               split_paragraphs=False, skip_bad_lines=False, shard_size_tokens=0, log_interval=1.0,
               progress=None, chunk_bytes=CHUNK_BYTES, replace=False) -> Summary:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document`` shard(s); see the module doc.

    Shards of an earlier run at the prefix that this run does not rewrite (higher-numbered ones, or
    the other naming) would silently join a glob or a blend: ``replace`` removes them once the new
    output is published; otherwise they are named in a warning."""
    if workers < 1:
        raise MegaGPTError(f"workers must be >= 1, got {workers}")
    if shard_size_tokens < 0:
        raise MegaGPTError(f"shard_size_tokens must be >= 0, got {shard_size_tokens}")
    files = expand_inputs(inputs)
    json_keys = unique_json_keys(json_keys)
    txt = [f for f in files if not is_json_file(f)]
    if txt and json_keys != ("text",):  # a txt document is one text, written under key "text"
        raise MegaGPTError(f"plain-text input {txt[0]} has no json keys {list(json_keys)}: --json-keys "
                           f"applies to .jsonl/.json(.gz) inputs; txt is always written as key 'text'")
    tok = load_tokenizer(tokenizer_path)  # fail fast, before any worker starts
    if append_eod and tok.eod_id is None:
        raise MegaGPTError(f"{tokenizer_path}: tokenizer has no eos/eod token; use append_eod=False")
    earlier = set(existing_outputs(output_prefix, json_keys))
    dtype, meta = dtype_for_vocab(tok.vocab_size), shard_meta(tok)
    outputs = {k: ShardedOutput(f"{output_prefix}_{k}_document", dtype, shard_size_tokens, meta) for k in json_keys}
    summary, t0 = Summary(), time.perf_counter()
    bar = _progress_bar(files, progress, log_interval)
    chunks = read_chunks(files, split_paragraphs, chunk_bytes=chunk_bytes)
    results = _map_ordered(encode_chunk, chunks, workers, (tok.path, json_keys, append_eod), tok)
    productive = set()  # input files that gave at least one document
    try:
        for chunk, enc in results:
            for line, msg in enc.errors:
                if not skip_bad_lines:
                    raise MegaGPTError(f"{enc.path}:{line}: {msg} (skip such lines with --skip-bad-lines)")
                summary.bad_lines += 1
            for k, out in outputs.items():
                out.add(enc.tokens[k], enc.sizes[k])
                summary.docs += len(enc.sizes[k])
                summary.tokens += int(enc.tokens[k].size)
                if len(enc.sizes[k]):
                    productive.add(enc.path)
            summary.empty_docs += enc.empty
            nbytes = sum(len(raw) for _, raw in chunk.items)
            summary.bytes += nbytes
            el = max(time.perf_counter() - t0, 1e-9)
            bar.update(nbytes)
            bar.set_postfix_str(f"{summary.docs / el:.0f} docs/s, {summary.tokens / el:.0f} tok/s", refresh=False)
        if not productive:
            raise MegaGPTError(f"no documents in {', '.join(map(str, inputs))}: empty, blank or only bad lines; "
                               f"nothing written")
        for out in outputs.values():
            summary.output_prefixes += out.commit()
    except BaseException:
        for out in outputs.values():
            out.abort()
        raise
    finally:
        results.close()  # stops the workers now, not at garbage collection
        bar.close()
    for path in files:
        if path not in productive:
            warnings.warn(f"{path}: no documents in this input (empty, blank or only bad lines)")
    written = {f"{p}{ext}" for p in summary.output_prefixes for ext in (".bin", ".idx", ".meta.json")}
    stale = sorted(earlier - written)
    if stale and replace:
        for path in stale:
            os.remove(path)
    elif stale:
        shards = [p for p in stale if p.endswith(".idx")] or stale
        warnings.warn(f"{len(shards)} shard(s) from an earlier run remain beside the new ones and are not part "
                      f"of this output: {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _map_ordered(fn, chunks, workers, init, tok=None):
    """Yield (chunk, fn(chunk)) in input order, from worker processes if workers > 1 (an executor,
    not a Pool: a worker killed e.g. by the OOM killer fails the run instead of hanging it)."""
    if workers == 1:
        _init_worker(*init, tok=tok)
        for c in chunks:
            yield c, fn(c)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                               initargs=(*init, True))
    inflight = deque()
    try:
        for c in chunks:
            inflight.append((c, pool.submit(fn, c)))
            if len(inflight) >= 2 * workers + 2:
                c0, f = inflight.popleft()
                yield c0, f.result()
        for c0, f in inflight:
            yield c0, f.result()
    except BrokenProcessPool:
        raise MegaGPTError(f"a preprocessing worker died (out of memory? try fewer --workers than {workers})") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(files, progress, log_interval):
    """tqdm over input bytes; ``progress=None`` shows it only on a terminal."""
    from tqdm import tqdm

    total = None if any(f.endswith(".gz") for f in files) else sum(os.path.getsize(f) for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", mininterval=log_interval,
                disable=None if progress is None else not progress)
