"""GPT pretraining samples: fixed ``seq_length + 1`` token windows over a shuffled document stream.

As in Megatron, the documents of a split are concatenated (reshuffled every epoch) into one
stream and sample ``i`` is stream tokens ``[i*S, (i+1)*S]`` (S = seq_length): windows cross
document boundaries, no token is padded away, and consecutive windows share one token so that
``tokens[:-1]``/``tokens[1:]`` give inputs/labels for every position. Samples are then shuffled
within each epoch, so each epoch still shows every document once before the next begins.

Three index arrays describe this (all numpy, built vectorised, cached on disk):
  ``doc_idx``     document ids in stream order, one shuffled permutation of the split per epoch;
  ``sample_idx``  ``(num_samples + 1, 2)``: (position in doc_idx, token offset) where sample i
                  starts; sample i ends at (inclusive) the start of sample i + 1;
  ``shuffle_idx`` dataset index -> stream sample index.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from megagpt.atomic import write_text_atomic
from megagpt.data import index_cache
from megagpt.data.indexed import IndexedDataset
from megagpt.errors import MegaGPTError

CLASS_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingOptions:
    """Megatron's document masking of packed samples (the ``data:`` keys of the same names).

    A sample window crosses document boundaries (see above); these options make each document in
    it behave as if trained alone. A document ends with its EOD token (the EOD belongs to the
    document it ends): ``reset_attention_mask`` lets no token attend to an earlier document,
    ``reset_position_ids`` restarts positions at 0 after each EOD, ``eod_mask_loss`` drops the
    positions whose input is EOD from the loss (Megatron-LM's rule: what follows an EOD is the next
    document, unpredictable from the one that ended)."""

    eod_id: int
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def from_config(cls, data_config, eod_id: Optional[int] = None) -> Optional["PackingOptions"]:
        """The options of ``data_config``, or None when all three are off (batches stay plain tensors).
        ``eod_id`` defaults to the EOD id of ``data_config.tokenizer``."""
        flags = {k: bool(getattr(data_config, k, False))
                 for k in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")}
        if not any(flags.values()):
            return None
        on = next(k for k, v in flags.items() if v)
        if eod_id is None:
            if not data_config.tokenizer:
                raise MegaGPTError(f"{on} needs the tokenizer's end-of-document id: set data.tokenizer", key=on)
            from megagpt.tokenizer import load_tokenizer
            eod_id = load_tokenizer(data_config.tokenizer).eod_id
            if eod_id is None:
                raise MegaGPTError(f"{on}: tokenizer {data_config.tokenizer} has no end-of-document token", key=on)
        return cls(int(eod_id), **flags)


class PackedInputs(NamedTuple):
    """A batch's model inputs under document masking (``split_batch``); the GPT accepts it where it
    takes ``input_ids``. ``position_ids``/``doc_ids`` (B, T) int64, None where their option is off."""

    input_ids: torch.Tensor
    position_ids: Optional[torch.Tensor]
    doc_ids: Optional[torch.Tensor]


def document_ids(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Per-token document index within each row, 0 at the start: an EOD token belongs to the document
    it ends, the token after it starts the next (one exclusive cumulative sum, no Python loop)."""
    eod = (input_ids == eod_id).long()
    return eod.cumsum(dim=1) - eod


def reset_positions(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Positions that restart at 0 after each EOD token: t minus the start of t's document, the
    start being a running maximum over the indices that begin a document."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eod_id
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def split_batch(tokens: torch.Tensor, packing: Optional[PackingOptions] = None):
    """(inputs, labels) of a (B, seq_length + 1) token batch: inputs ``tokens[:, :-1]``, labels
    ``tokens[:, 1:]``. With ``packing`` the inputs are a ``PackedInputs`` (when positions or the
    attention mask are reset) and the labels at EOD inputs become -100 (``eod_mask_loss``: predicting
    the next document's first token from the end of the previous one is noise); without it this is
    exactly the plain split every run has always used."""
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if packing is None:
        return x, y
    if packing.eod_mask_loss:
        y = y.masked_fill(x == packing.eod_id, -100)   # Megatron's rule: no loss where the input is EOD
    if packing.reset_attention_mask or packing.reset_position_ids:
        x = PackedInputs(x, reset_positions(x, packing.eod_id) if packing.reset_position_ids else None,
                         document_ids(x, packing.eod_id) if packing.reset_attention_mask else None)
    return x, y


def document_lengths(shard: IndexedDataset, lo: int, hi: int) -> np.ndarray:
    """Token count of documents ``lo .. hi-1`` (a document may span several sequences)."""
    s0, s1 = int(shard.doc_idx[lo]), int(shard.doc_idx[hi])
    cum = np.concatenate(([0], np.cumsum(shard.sizes[s0:s1], dtype=np.int64)))
    bounds = np.asarray(shard.doc_idx[lo: hi + 1], dtype=np.int64) - s0
    return np.diff(cum[bounds])


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Fewest epochs E with ``(E*T - 1) // S >= num_samples`` (the +1 is the overlap token)."""
    return -(-(num_samples * seq_length + 1) // tokens_per_epoch)


def build_doc_idx(lo: int, n_docs: int, num_epochs: int, seed: int) -> np.ndarray:
    """Each epoch a fresh permutation of documents ``lo .. lo+n_docs-1``, seeded by (seed, epoch)."""
    return np.concatenate([lo + np.random.default_rng([seed, 0, e]).permutation(n_docs) for e in range(num_epochs)])


def build_sample_idx(stream_doc_lengths: np.ndarray, num_samples: int, seq_length: int) -> np.ndarray:
    """Start (doc_idx position, offset) of every window; ``searchsorted`` over the cumulative
    stream length, so empty documents are stepped over and no Python loop runs per sample."""
    cum = np.concatenate(([0], np.cumsum(stream_doc_lengths, dtype=np.int64)))
    pos = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if pos[-1] >= cum[-1]:
        raise ValueError("document stream too short for the requested samples")
    where = np.searchsorted(cum, pos, side="right") - 1
    return np.stack([where, pos - cum[where]], axis=1)


def build_shuffle_idx(num_samples: int, tokens_per_epoch: int, seq_length: int, seed: int) -> np.ndarray:
    """Permute samples within each epoch's block (block e = samples starting in epoch e), so a
    run of 1.5 epochs sees every document once before any repeats."""
    n_epochs = -(-(num_samples * seq_length) // tokens_per_epoch)
    starts = [min(-(-(e * tokens_per_epoch) // seq_length), num_samples) for e in range(n_epochs)] + [num_samples]
    return np.concatenate([s + np.random.default_rng([seed, 1, b]).permutation(t - s)
                           for b, (s, t) in enumerate(zip(starts, starts[1:]))])


def check_tokens_cached(shard: IndexedDataset, vocab_size: int, cache_dir: Path, fingerprint: dict) -> None:
    """``shard.check_token_range`` once per (shard content, vocab): a marker file records the pass."""
    key = index_cache.describe_hash({"check": "token_range", "vocab_size": vocab_size, **fingerprint})
    marker = cache_dir / f"{Path(shard.prefix).name}_tokens_ok_{key}.json"
    if marker.exists():
        return
    shard.check_token_range(vocab_size)
    write_text_atomic(marker, json.dumps({"shard": shard.prefix, "vocab_size": vocab_size, **fingerprint}))


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` windows over documents ``doc_range = (lo, hi)`` of one shard: ``ds[i] ->
    {"tokens": int64 array of seq_length + 1}``. ``built_index``: False when loaded from cache.
    ``packing``: how batches of it are split (``split_batch``), set by ``build_gpt_datasets``."""

    packing: Optional[PackingOptions] = None

    def __init__(self, shard, doc_range, num_samples: int, seq_length: int, seed: int, *,
                 name: str = "train", split=None, cache_dir=None, vocab_size: int | None = None,
                 fingerprint: dict | None = None):
        self.shard = shard if isinstance(shard, IndexedDataset) else IndexedDataset(shard)
        lo, hi = (int(x) for x in doc_range)
        if not (0 <= lo < hi <= self.shard.num_documents):
            raise MegaGPTError(f"{self.shard.prefix}: document range [{lo}, {hi}) is empty or outside "
                               f"its {self.shard.num_documents} documents")
        if num_samples < 1 or seq_length < 1:
            raise MegaGPTError(f"{self.shard.prefix}: num_samples={num_samples} and seq_length={seq_length} "
                               f"must be >= 1")
        self.doc_range, self.num_samples, self.seq_length = (lo, hi), int(num_samples), int(seq_length)
        self.seed = int(seed)
        fingerprint = fingerprint or index_cache.shard_fingerprint(self.shard.prefix)
        self.cache_dir = index_cache.resolve_cache_dir(self.shard.prefix, cache_dir)
        self.description = {"class": "GPTDataset", "version": CLASS_VERSION, "shard": fingerprint,
                            "doc_range": [lo, hi], "seq_length": self.seq_length, "seed": self.seed,
                            "num_samples": self.num_samples, "split": [name, split]}
        self.cache_hash = index_cache.describe_hash(self.description)
        stem = self.cache_dir / f"{Path(self.shard.prefix).name}_{name}_{self.cache_hash}"
        check = None if vocab_size is None else (
            lambda: check_tokens_cached(self.shard, vocab_size, self.cache_dir, fingerprint))
        self.paths, self.built_index = index_cache.cached_arrays(
            stem, ("doc_idx", "sample_idx", "shuffle_idx"), self.description, self._build_arrays, check)
        self._map()

    def _map(self):
        """Load the cached index arrays and view the shard's maps: all that pickling leaves out."""
        arrs = {k: index_cache.load_npy(p) for k, p in self.paths.items()}
        n = self.num_samples
        if arrs["shuffle_idx"].shape != (n,) or arrs["sample_idx"].shape != (n + 1, 2):
            raise MegaGPTError(f"{self.paths['sample_idx']}: cached index does not match its description "
                               f"(expected {n} samples); delete the cache files and rerun")
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrs["doc_idx"], arrs["sample_idx"], arrs["shuffle_idx"]
        # plain ndarray views of the shard's maps (np.memmap indexing is slow per scalar)
        self._tokens = self.shard.tokens.view(np.ndarray)
        self._seq_ptr, self._sizes, self._shard_doc_idx = self.shard.pointers, self.shard.sizes, self.shard.doc_idx
        self._itemsize = self.shard.dtype.itemsize

    _MAPPED = ("shard", "doc_idx", "sample_idx", "shuffle_idx", "_tokens", "_seq_ptr", "_sizes", "_shard_doc_idx")

    def __getstate__(self):
        """Pickle paths, not arrays: pickling a memory map copies its whole content, which would
        ship the corpus to every spawned DataLoader worker."""
        state = {k: v for k, v in self.__dict__.items() if k not in self._MAPPED}
        state["shard_prefix"] = self.shard.prefix
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.shard = IndexedDataset(state["shard_prefix"])
        self._map()

    def _build_arrays(self) -> dict:
        lo, hi = self.doc_range
        lengths = document_lengths(self.shard, lo, hi)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch == 0:
            raise MegaGPTError(f"{self.shard.prefix}: documents [{lo}, {hi}) hold no tokens")
        epochs = num_epochs_needed(tokens_per_epoch, self.num_samples, self.seq_length)
        doc_idx = build_doc_idx(lo, hi - lo, epochs, self.seed)
        sample_idx = build_sample_idx(lengths[doc_idx - lo], self.num_samples, self.seq_length)
        shuffle_idx = build_shuffle_idx(self.num_samples, tokens_per_epoch, self.seq_length, self.seed)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return self.num_samples

    def _doc_tokens(self, doc: int) -> np.ndarray:
        """All tokens of shard document ``doc`` (its sequences are stored back to back)."""
        s0, s1 = self._shard_doc_idx[doc:doc + 2].tolist()
        if s0 == s1:
            return self._tokens[:0]
        start = self._seq_ptr[s0].item() // self._itemsize
        n = self._sizes[s0].item() if s1 == s0 + 1 else int(self._sizes[s0:s1].sum())  # usually one sequence
        return self._tokens[start:start + n]

    def stream_sample(self, j: int) -> np.ndarray:
        """Sample ``j`` in stream (unshuffled) order."""
        (p0, o0), (p1, o1) = self.sample_idx[j:j + 2].tolist()
        docs = self.doc_idx[p0:p1 + 1].tolist()
        if p0 == p1:
            return self._doc_tokens(docs[0])[o0:o1 + 1].astype(np.int64)
        return np.concatenate([self._doc_tokens(docs[0])[o0:], *map(self._doc_tokens, docs[1:-1]),
                               self._doc_tokens(docs[-1])[:o1 + 1]], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return {"tokens": self.stream_sample(self.shuffle_idx[i].item())}

    def source(self, i: int) -> tuple[str, list]:
        """(shard prefix, shard document ids) that sample ``i`` is cut from."""
        j = int(self.shuffle_idx[i])
        (p0, _), (p1, _) = self.sample_idx[j:j + 2].tolist()
        return self.shard.prefix, self.doc_idx[p0:p1 + 1].tolist()


def describe_samples(dataset, indices) -> str:
    """Which shards and documents samples ``indices`` of a GPT or blended dataset come from."""
    docs = {}
    for i in indices:
        prefix, ids = dataset.source(i)
        docs.setdefault(prefix, set()).update(ids)
    return "; ".join(f"{p}: documents {', '.join(map(str, sorted(d)))}" for p, d in docs.items())


def split_document_ranges(num_docs: int, ratios) -> list[tuple[int, int]]:
    """Contiguous (train, valid, test) document ranges; boundaries are the rounded cumulative
    ratios, so each split is within one document of its share and the three never overlap."""
    cum = np.cumsum(np.asarray(ratios, dtype=np.float64))
    bounds = [0] + [int(round(c / cum[-1] * num_docs)) for c in cum]
    bounds[-1] = num_docs
    return [(bounds[k], max(bounds[k], bounds[k + 1])) for k in range(3)]


def build_gpt_datasets(data_config, num_samples, vocab_size: int):
    """(train, valid, test): each a ``GPTDataset`` (one prefix), a ``BlendedDataset`` (several),
    or None when the split has no documents or 0 samples are requested. Every prefix is split by
    documents with the same ratios; a blend draws ``num_samples[k]`` from the k-th split of each
    prefix in proportion to the weights.

    Call it on every rank: with torch.distributed initialised it is a collective (rank 0
    builds and checks, the others wait and load)."""
    from megagpt.data.blend import BlendedDataset, max_draws, normalise_weights

    if len(num_samples) != 3 or any(isinstance(n, bool) or int(n) != n or n < 0 for n in num_samples):
        raise MegaGPTError(f"num_samples={num_samples!r} must be 3 non-negative integers (train, valid, test)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise MegaGPTError(f"vocab_size={vocab_size!r} must be a positive integer")
    cfg = data_config
    shards = [IndexedDataset(p) for p in cfg.prefixes]
    prints = [index_cache.shard_fingerprint(p) for p in cfg.prefixes]
    ranges = [split_document_ranges(s.num_documents, cfg.split_ratios) for s in shards]
    out = []
    for k, name in enumerate(("train", "valid", "test")):
        members = [(s, r[k], w, fp) for s, r, w, fp in zip(shards, ranges, cfg.weights, prints) if r[k][1] > r[k][0]]
        n = int(num_samples[k])
        if n and not members and k == 0:  # no validation data only means no evaluation; no training data is fatal
            docs = ", ".join(f"{s.prefix} ({s.num_documents} documents)" for s in shards)
            raise MegaGPTError(f"train split is empty: {docs} with split={cfg.split} leave no documents for "
                               f"training", key="split")
        if n == 0 or not members:
            if n > 0:
                log.warning("%s split is empty (split=%s): no %s dataset", name, cfg.split, name)
            out.append(None)
            continue
        if len(members) < len(shards):
            log.warning("%s split: %d of %d prefixes have no documents in it; blending the rest",
                        name, len(shards) - len(members), len(shards))
        weights = normalise_weights([m[2] for m in members])
        parts = [GPTDataset(s, r, max_draws(w, n), cfg.seq_length, cfg.seed, name=name, split=list(cfg.split_ratios),
                            cache_dir=cfg.cache_dir, vocab_size=vocab_size, fingerprint=fp)
                 for (s, r, _, fp), w in zip(members, weights)]   # one member: max_draws(1.0, n) == n
        out.append(parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, n, cfg.seed))
    packing = PackingOptions.from_config(cfg)
    for ds in out:   # the batch builder reads it (train.loop.to_batch -> split_batch)
        if ds is not None:
            ds.packing = packing
    return tuple(out)
