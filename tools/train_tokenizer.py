#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) with megagpt's reserved special ids.

    python tools/train_tokenizer.py --input corpus/*.jsonl --vocab-size 32000 --output-prefix tok/my

writes tok/my.model + tok/my.vocab; ids 0..5 are <pad> <unk> <s> </s> <delim> <cls>
(see megagpt/tokenizer.py for why).
"""
import argparse
import os
import tempfile
from pathlib import Path

from megagpt.atomic import refuse_existing, write_bytes_atomic, writing
from megagpt.errors import MegaGPTError, cli_main
from megagpt.tokenizer import load_tokenizer, train_sentencepiece, unique_json_keys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="txt / jsonl / jsonl.gz files, globs or folders (recursive); one or more")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys of jsonl records whose text is used (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, specials included")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece algorithm (default: bpe)")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="spell characters outside the vocabulary as UTF-8 byte pieces instead of <unk> (default: on)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many sentences (0 = all, the default)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="sentencepiece training threads (default: all cores)")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model / PREFIX.vocab")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.workers < 1:
        raise MegaGPTError(f"--workers must be >= 1, got {args.workers}")
    out = Path(args.output_prefix)
    if not args.force:
        refuse_existing([f"{out}.model", f"{out}.vocab"])
    json_keys = unique_json_keys(args.json_keys)   # before the output folder is made
    # sentencepiece writes PREFIX.model/.vocab in place: train into a hidden scratch dir beside the
    # output, then publish each file atomically (.model last: it is the one loaded)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as scratch:
            staged = Path(scratch) / out.name
            train_sentencepiece(args.input, str(staged), vocab_size=args.vocab_size,
                                model_type=args.model_type, json_keys=json_keys,
                                byte_fallback=args.byte_fallback, input_sentence_size=args.input_sentence_size,
                                num_threads=args.workers, verbose=args.verbose)
            for ext in (".vocab", ".model"):
                write_bytes_atomic(f"{out}{ext}", Path(f"{staged}{ext}").read_bytes())
    model = f"{out}.model"
    tok = load_tokenizer(model)
    print(f"wrote {model} (vocab_size {tok.vocab_size})")
    print(f"special ids: pad={tok.pad_id} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} "
          f"(eod={tok.eod_id}) delim={tok.delim_id} cls={tok.cls_id}")


if __name__ == "__main__":
    main()
