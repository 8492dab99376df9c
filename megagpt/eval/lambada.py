"""A LAMBADA-style last-word task from any text: passages whose final word the model must predict.

LAMBADA (Paperno et al., 2016) scores the last word of a passage given the rest. ``lambada_docs``
cuts such passages from held-back text: the blank-line separated paragraphs of the last
``tail_fraction`` of the file (text a training split would hold out), those of at least
``min_words`` words whose last word is alphabetic; trailing punctuation is dropped, so the target is
the bare word (``{"context": "...lies your", "target": " way"}``, the space belonging to the target,
as lm-eval's own lambada tasks have it). The default text of ``lambada_local`` is the last 10% of
tinyshakespeare: unseen by a model trained on another corpus (the quickstart's King James Bible),
but seen by the tests' tinyshakespeare models, for which the task is a plumbing check only.

``python -m megagpt.eval.lambada TEXT OUT.jsonl`` writes the documents as jsonl; a ``.jsonl`` given
as the task's text (``tools/evaluate.py --lambada-text``) is read back as documents.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from megagpt.errors import MegaGPTError
from megagpt.finetune.readers import read_text   # finetuning's reader: a binary file is one error naming file:line

# the passage's last word: letters after whitespace, then only punctuation ("green;" yes, "to-day" no)
_LAST_WORD = re.compile(r"(?<=\s)([A-Za-z]+)[^\w\s]*$")


def lambada_docs(text: str, tail_fraction: float = 0.1, min_words: int = 24) -> list[dict]:
    """``{"context", "target"}`` passages cut from the last ``tail_fraction`` of ``text``'s paragraphs."""
    if not 0 < tail_fraction <= 1:
        raise MegaGPTError(f"tail_fraction={tail_fraction}: must be in (0, 1]")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs = []
    for p in paragraphs[int(len(paragraphs) * (1 - tail_fraction)):]:
        m = _LAST_WORD.search(p)
        if m is not None and len(p.split()) >= min_words:
            docs.append({"context": p[: m.start(1)].rstrip(), "target": " " + m.group(1)})
    return docs


def read_lambada(path) -> list[dict]:
    """Documents from a ``.jsonl`` written by ``write_lambada``, or cut from a text file."""
    p = Path(path)
    if p.suffix != ".jsonl":
        return lambada_docs(read_text(p))
    docs = []
    for n, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            ok = isinstance(doc.get("context"), str) and isinstance(doc.get("target"), str) and doc["target"].strip()
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise MegaGPTError(f"{p}:{n}: expected a JSON object with string fields 'context' and 'target' "
                               f"(as python -m megagpt.eval.lambada writes; plain text goes in a .txt)")
        docs.append({"context": doc["context"], "target": doc["target"]})
    return docs


def write_lambada(text_path, out_path, tail_fraction: float = 0.1, min_words: int = 24, force: bool = True) -> int:
    """Write ``lambada_docs`` of a text file as jsonl (published atomically; an existing one only with
    ``force``); returns the count."""
    from megagpt.atomic import write_text_atomic

    src = Path(text_path)
    docs = lambada_docs(read_text(src), tail_fraction, min_words)
    if not docs:
        raise MegaGPTError(f"{src}: no paragraph of >= {min_words} words ending in a word in its last "
                           f"{tail_fraction:.0%}")
    write_text_atomic(out_path, "".join(json.dumps(d) + "\n" for d in docs), force)
    return len(docs)


if __name__ == "__main__":
    from megagpt.errors import cli_main

    @cli_main
    def main(argv=None):
        import argparse

        ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        ap.add_argument("text", help="held-back text file (paragraphs separated by blank lines)")
        ap.add_argument("output", help="the jsonl to write")
        ap.add_argument("--tail-fraction", type=float, default=0.1, help="use the last fraction of paragraphs")
        ap.add_argument("--min-words", type=int, default=24, help="shortest passage, in words")
        ap.add_argument("--force", action="store_true", help="replace an existing output file")
        a = ap.parse_args(argv)
        from megagpt.atomic import check_output_file

        check_output_file(a.output, a.force)
        print(f"{write_lambada(a.text, a.output, a.tail_fraction, a.min_words, a.force)} passages -> {a.output}")
        return 0

    sys.exit(main())
