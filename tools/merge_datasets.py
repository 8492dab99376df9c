#!/usr/bin/env python
"""Concatenate Megatron .bin/.idx shards into one, keeping document boundaries (doc_idx) right.

    python tools/merge_datasets.py --input shards/web_text_document_00000 shards/web_text_document_00001 \\
        --output-prefix shards/web_all
    python tools/merge_datasets.py --input shards/ --pattern 'web_text_document_*' --output-prefix shards/web_all

Inputs are merged in the order given (a folder's shards in sorted name order). All inputs must
share one dtype (made with the same tokenizer); the output appears only once complete.
"""
import argparse
import fnmatch
import json
import os
from pathlib import Path

from megagpt.errors import MegaGPTError, cli_main


def find_prefixes(inputs, pattern="*") -> list[str]:
    """Shard prefixes from prefixes and/or folders (each folder: its *.idx matching ``pattern``, sorted);
    each shard at most once (``merge_datasets`` itself may be given one twice, on purpose)."""
    prefixes = []
    for arg in map(str, inputs):
        if os.path.isdir(arg):
            found = sorted(str(p.with_suffix("")) for p in Path(arg).glob("*.idx")
                           if fnmatch.fnmatch(p.stem, pattern))
            if not found:
                raise MegaGPTError(f"{arg}: no *.idx shards matching {pattern!r} in this folder")
            prefixes += found
        else:
            prefixes.append(arg[:-4] if arg.endswith((".bin", ".idx")) else arg)
    seen = set()
    for p in prefixes:   # a shard given twice (as a prefix, a .bin/.idx or within a folder) would be merged twice
        real = os.path.realpath(p)
        if real in seen:
            raise MegaGPTError(f"--input {p} is given twice")
        seen.add(real)
    return prefixes


def merge_datasets(prefixes, output_prefix) -> "IndexedDataset":
    """Write the concatenation of ``prefixes`` to ``output_prefix`` (atomic) and return it opened."""
    from megagpt.atomic import write_text_atomic, writing
    from megagpt.data.indexed import (IndexedDataset, IndexedDatasetWriter,  # lazy: megagpt.data pulls in torch
                                      meta_path, read_meta)

    if not prefixes:
        raise MegaGPTError("no input shards to merge")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise MegaGPTError(f"{output_prefix}: the output prefix is also an input; choose another")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing anything
    dtype = datasets[0].dtype
    for p, ds in zip(prefixes, datasets):
        if ds.dtype != dtype:
            raise MegaGPTError(f"{p}: token dtype {ds.dtype} differs from {dtype} of {prefixes[0]}; "
                               f"these shards were made with different tokenizers and cannot be merged")
    metas = {p: read_meta(p) for p in prefixes}
    made = {p: m["tokenizer"]["sha256"] for p, m in metas.items() if m is not None}
    if len(set(made.values())) > 1:
        a, b = [next(p for p in made if made[p] == h) for h in list(dict.fromkeys(made.values()))[:2]]
        raise MegaGPTError(f"{a} and {b} were made with different tokenizers ({metas[a]['tokenizer']['path']}, "
                           f"{metas[b]['tokenizer']['path']}); their ids cannot be merged into one shard")
    with writing(output_prefix):
        with IndexedDatasetWriter(output_prefix, dtype) as w:
            for p in prefixes:
                w.add_index(p)
        if all(metas[p] is not None for p in prefixes):   # every input known, one tokenizer: so is the output
            write_text_atomic(meta_path(output_prefix), json.dumps(metas[prefixes[0]], indent=1))
    return IndexedDataset(output_prefix)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="shard prefixes (PREFIX of PREFIX.bin/.idx) and/or folders holding shards")
    p.add_argument("--pattern", default="*", help="for folder inputs: glob on the shard name (default: *)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin / PREFIX.idx")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    a = parse_args(argv)
    prefixes = find_prefixes(a.input, a.pattern)
    if not a.force:
        from megagpt.atomic import refuse_existing

        refuse_existing([f"{a.output_prefix}.bin", f"{a.output_prefix}.idx"])
    ds = merge_datasets(prefixes, a.output_prefix)
    print(f"merged {len(prefixes)} shards: {ds.num_documents} docs, {ds.num_tokens} tokens ({ds.dtype}) "
          f"→ {a.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
