"""GPT-1 input transforms on token-id lists (Radford et al. 2018, figure 1), plus padding.

    classification   <s> x <cls>
    entailment       <s> premise <delim> hypothesis <cls>
    similarity       <s> a <delim> b <cls>   and   <s> b <delim> a <cls>   (both orders)
    multiple choice  <s> context <delim> answer_k <cls>   for each k

``<cls>`` is the paper's extract token ``<e>``, whose final state feeds the head. Specials are inserted
as ids, never by text, so user text cannot forge them. Truncation keeps the answer side (``pair``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.errors import MegaGPTError


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    delim: int
    cls: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        ids = {"bos": tok.bos_id, "delim": tok.delim_id, "cls": tok.cls_id, "pad": tok.pad_id}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise MegaGPTError(f"tokenizer {tok.path} has no {', '.join(missing)} token; finetuning needs "
                               f"<s>, <delim>, <cls> and <pad> (train it with megagpt's train_tokenizer)")
        return cls(**ids)


def single(x: list[int], sp: SpecialIds, seq_length: int) -> list[int]:
    """``<s> x <cls>``; x keeps its end when too long (the paper's classification layout)."""
    room = seq_length - 2
    if room < 1:
        raise MegaGPTError(f"seq_length {seq_length} leaves no room for text between <s> and <cls>")
    x = x[len(x) - room:] if len(x) > room else x
    return [sp.bos, *x, sp.cls]


def pair(first: list[int], second: list[int], sp: SpecialIds, seq_length: int) -> list[int]:
    """``<s> first <delim> second <cls>``. Too long: ``first`` (context, premise) loses tokens from
    its left, keeping the words next to the answer; only if ``second`` alone does not fit is it cut
    from its right. The specials are always kept."""
    room = seq_length - 3
    if room < 1:
        raise MegaGPTError(f"seq_length {seq_length} leaves no room for text around <s>, <delim>, <cls>")
    second = second[:room]                       # only when the answer alone overflows
    keep_first = room - len(second)
    first = first[len(first) - keep_first:] if len(first) > keep_first else first
    return [sp.bos, *first, sp.delim, *second, sp.cls]


def classification(x, sp, seq_length):
    return [single(x, sp, seq_length)]


def entailment(premise, hypothesis, sp, seq_length):
    return [pair(premise, hypothesis, sp, seq_length)]


def similarity(a, b, sp, seq_length):
    """Both orderings, which the head sums. Listed in canonical (sorted) order so that (a, b) and
    (b, a) give the identical batch, hence a *bitwise* equal output: a BLAS matmul may round a row
    differently depending on where in the batch it sits, which the sum would not undo."""
    return sorted([pair(a, b, sp, seq_length), pair(b, a, sp, seq_length)])


def multiple_choice(context, answers, sp, seq_length):
    return [pair(context, ans, sp, seq_length) for ans in answers]


def pad_batch(seqs: list[list[int]], pad_id: int, cls_id: int):
    """Right-pad to the longest sequence → (input_ids (N, T), cls_pos (N,), lm_labels (N, T)).
    ``cls_pos``: each row's last ``<cls>``, never assumed to be the last column. ``lm_labels[i, t] =
    ids[i, t+1]`` (the auxiliary LM loss's targets), -100 at padding."""
    if not seqs:
        raise MegaGPTError("pad_batch: empty batch")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    cls_pos = torch.empty(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        if cls_id not in s:
            raise MegaGPTError(f"pad_batch: sequence {i} has no <cls> token (id {cls_id})")
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        labels[i, :len(s) - 1] = ids[i, 1:len(s)]
        cls_pos[i] = len(s) - 1 - s[::-1].index(cls_id)
    return ids, cls_pos, labels
