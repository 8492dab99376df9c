#!/usr/bin/env python
"""Tokenize jsonl / txt corpora into Megatron .bin/.idx shards (megagpt.data.preprocess).

    python tools/preprocess_data.py --input data/*.jsonl.gz --output-prefix shards/web \\
        --tokenizer-model tok/my.model --workers 16

writes shards/web_text_document.bin/.idx (one pair per --json-keys key; with
--shard-size-tokens N: shards/web_text_document_00000.bin/.idx, _00001, ...).
"""
import argparse
import os

from megagpt.errors import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, globs or folders (recursive, sorted). .jsonl/.json/.jsonl.gz: one document "
                        "per line; anything else is plain text (one document per file, see --split-paragraphs)")
    p.add_argument("--output-prefix", required=True, help="outputs are PREFIX_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-model", required=True,
                   help="sentencepiece .model, or a folder with GPT-2 encoder.json + vocab.bpe "
                        "(or its HF tokenizer.json)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="jsonl keys to tokenize, one output per key (default: text)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: all cores); the output is identical for any count")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token after each document (default: on)")
    p.add_argument("--split-paragraphs", action="store_true",
                   help="plain text: one document per blank-line-separated paragraph instead of per file")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed JSON / missing key / invalid UTF-8 lines instead of failing")
    p.add_argument("--shard-size-tokens", type=int, default=0,
                   help="start a new numbered shard once one holds this many tokens (0 = one shard, the default)")
    p.add_argument("--log-interval", type=float, default=1.0, help="seconds between progress-bar updates")
    p.add_argument("--force", action="store_true", help="overwrite existing shards at the output prefix (stale "
                   "numbered shards of an earlier run are removed)")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    a = parse_args(argv)
    # after parsing: megagpt.data pulls in torch, --help should not
    from megagpt.data.preprocess import existing_outputs, preprocess

    if not a.force:
        from megagpt.atomic import refuse_existing

        refuse_existing(existing_outputs(a.output_prefix, a.json_keys))
    summary = preprocess(a.input, a.output_prefix, a.tokenizer_model, json_keys=tuple(a.json_keys),
                         workers=a.workers, append_eod=a.append_eod, split_paragraphs=a.split_paragraphs,
                         skip_bad_lines=a.skip_bad_lines, shard_size_tokens=a.shard_size_tokens,
                         log_interval=a.log_interval, replace=True)   # --force: drop an earlier run's extra shards
    print(f"done: {summary}")
    for prefix in summary.output_prefixes:
        print(f"wrote {prefix}.bin/.idx")


if __name__ == "__main__":
    main()
