"""GPT-2 BPE fast path: shards byte-identical to HF ``tokenizers`` end to end and to transformers'
pure-Python GPT2Tokenizer, on text we did not write (tinyshakespeare) plus generated hard cases."""
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex

from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.data.preprocess import preprocess
from megagpt.tokenizer import GPT2BPETokenizer, Tokenizer, _unverified, load_tokenizer

from test_preprocess import paragraphs, write_jsonl

WHITESPACE = ["\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u1680", "\u2003",
              "\u2028", "\u2029", "\u202f", "\u3000", "\u180e", "\u200b", "\ufeff"]
POOLS = [  # (first, last) code point ranges words are drawn from
    (0x61, 0x7a), (0x41, 0x5a), (0x30, 0x39), (0x21, 0x2f), (0xc0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff),
    (0x5d0, 0x5ea), (0x620, 0x64a), (0x660, 0x669), (0x900, 0x97f), (0xe00, 0xe5b), (0x3040, 0x30ff),
    (0x4e00, 0x4f00), (0xac00, 0xad00), (0xff10, 0xff5a), (0x2070, 0x209c), (0x1d400, 0x1d4ff),
    (0x1f300, 0x1f64f), (0x1f900, 0x1f9ff), (0xe000, 0xe0ff), (0x300, 0x36f), (0x20000, 0x20100)]
EMOJI = ["\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7", "\u2764\ufe0f"]
SPECIALS = ["<|endoftext|>", "<pad>", "<cls>", "'s", "'S", "'ll", "'ve", "'re", "'d", "'m", "'t", "''", "n't"]


def word(rng):
    r = rng.random()
    if r < 0.1:
        return rng.choice(SPECIALS + EMOJI)
    lo, hi = rng.choice(POOLS)
    chars = (chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))
    return "".join(c for c in chars if unicodedata.category(c) != "Cn") or "x"


def ascii_word(rng):
    return rng.choice(SPECIALS + ["".join(chr(rng.randint(0, 127)) for _ in range(rng.randint(1, 8)))])


def generated_docs(seed=0, n=300):
    """Unicode-heavy / emoji / whitespace-run documents, ASCII ones (control characters, \\x1c-\\x1f),
    then very long ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ascii_only = i % 3 == 0  # ASCII documents take another split path (stdlib re)
        spaces = [c for c in WHITESPACE if c.isascii()] if ascii_only else WHITESPACE
        parts = []
        for _ in range(rng.randint(1, 80)):
            parts.append(ascii_word(rng) if ascii_only else word(rng))
            gap = rng.random()
            parts.append(" " if gap < 0.6 else "" if gap < 0.7 else
                         "".join(rng.choice(spaces + [" "]) for _ in range(rng.randint(1, 9))))
        docs.append("".join(parts))
    docs += [" ".join(word(rng) for _ in range(30000)),            # ~200k chars
             " " * 20000 + "x" + "\n" * 5000 + " y " + "\t \t" * 3000,  # long whitespace runs
             "ab" * 1500 + " " + "9" * 3000 + "!?" * 1000]      # very long words
    return docs


def reference_shard(prefix, docs, encode, eod):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(encode(d) + [eod])


def same_bytes(a, b):
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def old_path(monkeypatch):
    """GPT-2 BPE back to the previous path: HF ``encode_batch`` per document, flattened generically."""
    monkeypatch.setattr(GPT2BPETokenizer, "encode_batch", GPT2BPETokenizer.encode_batch_hf)
    monkeypatch.setattr(GPT2BPETokenizer, "encode_flat", Tokenizer.encode_flat)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return str(shared_data / "tokenizers" / "gpt2")


def test_shards_identical_to_hf_path_and_pure_python_gpt2(tmp_path, gpt2, shakespeare_txt, monkeypatch):
    from transformers import ClvpTokenizer

    docs = paragraphs(shakespeare_txt.read_text(encoding="utf-8")) + generated_docs()
    assert not any(_unverified(docs))  # every character here is on the fast path
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    preprocess([src], str(tmp_path / "new"), gpt2, progress=False)
    # the independent reference: GPT-2's original algorithm in pure Python on the same files.
    # transformers 5 dropped the slow GPT2Tokenizer (it is HF tokenizers now); ClvpTokenizer keeps
    # that code (byte map, regex split, rank-ordered merges), used here without its English normalizer
    slow = ClvpTokenizer(str(Path(gpt2) / "encoder.json"), str(Path(gpt2) / "vocab.bpe"))

    def slow_encode(doc):
        pieces = (slow.bpe("".join(slow.byte_encoder[b] for b in w.encode())) for w in regex.findall(slow.pat, doc))
        return [slow.encoder[t] for p in pieces for t in p.split(" ")]

    reference_shard(str(tmp_path / "slow"), docs, slow_encode, 50256)
    assert same_bytes(str(tmp_path / "new_text_document"), str(tmp_path / "slow"))
    # the previous path, HF tokenizers end to end per document, through the whole preprocess
    old_path(monkeypatch)
    preprocess([src], str(tmp_path / "old"), gpt2, progress=False)
    assert same_bytes(str(tmp_path / "new_text_document"), str(tmp_path / "old_text_document"))


def test_characters_beyond_unicodedata_take_hf_path(tmp_path, gpt2, monkeypatch):
    """U+10940.. (Unicode 17) is a letter to ``regex`` but not to HF's Oniguruma: "a\\U00010940b" is
    one pre-token for one engine and three for the other, so such documents must use HF's split
    (GPT-2's merges happen not to cross these characters, so the ids alone cannot show it)."""
    from megagpt.tokenizer import _GPT2_SPLIT

    tok = load_tokenizer(gpt2)
    probe = "a\U00010940b"
    assert len(_GPT2_SPLIT(probe)) != len(tok.hf.pre_tokenizer.pre_tokenize_str(probe))
    rng = random.Random(1)
    new_letters = [chr(c) for c in (0x10940, 0x10950, 0x11db0, 0x16ea0, 0x1e6c0, 0x88f, 0xc5c, 0xa7ce)]
    docs = ["".join(rng.choice(new_letters + ["a", "b", " ", "1", "!"]) for _ in range(rng.randint(1, 60)))
            for _ in range(200)] + ["plain ascii", "caf\xe9 \U0001f600"]
    assert _unverified(docs) == [True] * 200 + [False, False]
    assert tok.encode_batch(docs) == tok.encode_batch_hf(docs)
    assert not any(_unverified(list(tok._word_ids)))  # their words never went through `regex`
    src = write_jsonl(tmp_path / "new.jsonl", [{"text": d} for d in docs])
    preprocess([src], str(tmp_path / "new"), gpt2, progress=False)
    old_path(monkeypatch)
    preprocess([src], str(tmp_path / "old"), gpt2, progress=False)
    assert same_bytes(str(tmp_path / "new_text_document"), str(tmp_path / "old_text_document"))


def test_regex_engines_agree_on_every_assigned_character(gpt2, monkeypatch):
    """The premise of the fast path: Python's ``regex`` and HF's Oniguruma split GPT-2's pattern the
    same way around every character ``unicodedata`` knows (CJK ideographs and private use sampled:
    one class each), and a cache emptied mid-batch changes nothing."""
    import megagpt.tokenizer as t

    tok = load_tokenizer(gpt2)
    big = ((0x3400, 0xa000), (0xac00, 0xd7a4), (0xe000, 0xf900), (0x17000, 0x18d09), (0x1b000, 0x1b300),
           (0x20000, 0x323b0), (0xf0000, 0x110000))  # one class each: CJK, Hangul, Tangut, Kana, private use
    sampled = lambda c: not any(lo <= c < hi for lo, hi in big)
    cps = [c for c in range(0x110000) if (sampled(c) or c % 101 == 0)
           and unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    probe = "a{0}1{0}!{0} {0}{0}  {0}\n'{0}s {0}\t{0}"
    docs = ["".join(probe.format(chr(c)) for c in cps[i:i + 500]) for i in range(0, len(cps), 500)]
    docs += [probe.format(chr(c)) + probe.format(chr(d)) for c in range(128) for d in range(0, 128, 7)]  # ASCII: re
    assert not any(_unverified(docs))
    monkeypatch.setattr(t, "WORD_CACHE_SIZE", 5000)  # forces the cache to be emptied many times
    assert tok.encode_batch(docs) == tok.encode_batch_hf(docs)
