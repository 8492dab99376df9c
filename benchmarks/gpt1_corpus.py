"""The GPT-1 miniature's pretraining corpus: English text that Debian ships, plus the GLUE
training sentences without their labels, written as JSONL (one document per line).

Why these: the study must run offline from the registries this project may reach (PyPI, Debian),
and no package there ships a BooksCorpus. Debian's English prose that is large and free:

==================  ===========================================  ==============================
package             what it holds                                 one document is
==================  ===========================================  ==============================
dict-gcide          GNU Collaborative International Dictionary   one headword's entry
                    (Webster 1913 + additions): definitions and
                    literary quotations
wordnet-base        WordNet 3.0 glosses and usage examples        50 consecutive synsets
python3.11-doc      the Python documentation (reST sources)       one page
linux-doc-6.1       the Linux kernel documentation (reST)         one file (translations left out)
perl-doc            the Perl documentation (POD)                  one file
postgresql-doc-15   the PostgreSQL 15 manual (HTML, tags          one page
                    stripped)
git-doc             the git manual pages and guides (AsciiDoc)    one file
==================  ===========================================  ==============================

In-domain unlabeled text, which the paper's setting allows: the *training* sentences of SST-2,
RTE, MRPC and STS-B, labels dropped (``glue_train.jsonl``). Dev sets, COPA and Story Cloze
never enter the corpus.

    python benchmarks/gpt1_corpus.py --out /tmp/gpt1/corpus [--data-root ../shared/data]

Packages are fetched with ``apt-get download`` (no root needed) into ``<out>/debs`` and their
versions and sha256 recorded in ``<out>/manifest.json``; ``--debs DIR`` reuses downloaded ones.
"""
import argparse
import csv
import glob
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megagpt.atomic import write_text_atomic  # noqa: E402
from megagpt.errors import MegaGPTError, cli_main  # noqa: E402

PACKAGES = ("dict-gcide", "wordnet-base", "python3.11-doc", "linux-doc-6.1", "perl-doc", "postgresql-doc-15",
            "git-doc")
GLUE_TRAIN = {"SST-2": ("sentence",), "RTE": ("sentence1", "sentence2"), "MRPC": ("#1 String", "#2 String"),
              "STS-B": ("sentence1", "sentence2")}

_GCIDE_SOURCE = re.compile(r"^\s*\[[^\]]*(Webster|PJC|Century|WordNet|Dict|Chambers|RN|Mw|Brit)[^\]]*\]\s*$")
_GCIDE_PRON = re.compile(r"\\[^\\\n]*\\")


def gcide_documents(text: str):
    """dictd's gcide.dict (uncompressed) → one cleaned document per headword entry.

    Entries start at column 0 after a blank line; source tags (``[1913 Webster]``) and the
    pronunciation markup (``\\Af*fect"\\``) are dropped, cross-reference braces unwrapped, and
    each paragraph's lines joined."""
    entry: list[list[str]] = []

    def flush():
        paras = [" ".join(p) for p in entry if p]
        if paras:
            yield "\n".join(paras)

    para: list[str] = []
    for line in text.splitlines():
        if _GCIDE_SOURCE.match(line):
            continue
        if not line.strip():
            if para:
                entry.append(para)
                para = []
            continue
        if not line[0].isspace() and not para:   # a new headword
            yield from flush()
            entry = []
        clean = _GCIDE_PRON.sub("", line).replace("{", "").replace("}", "").strip()
        if clean:
            para.append(clean)
    if para:
        entry.append(para)
    yield from flush()


def wordnet_documents(data_files, group: int = 50):
    """WordNet ``data.*`` files → glosses (definition; "examples") grouped ``group`` synsets a document."""
    buf = []
    for path in data_files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "| " not in line:   # the licence header, or no gloss
                    continue
                buf.append(line.split("| ", 1)[1].strip())
                if len(buf) == group:
                    yield "\n".join(buf)
                    buf = []
    if buf:
        yield "\n".join(buf)


_HTML_SKIP = re.compile(r"(?is)<(script|style|head)\b.*?</\1>")
_HTML_TAG = re.compile(r"<[^>]+>")


def html_text(page: str) -> str:
    """Visible text of an HTML page: script/style/head dropped, tags removed, entities decoded,
    runs of blank lines collapsed."""
    text = html.unescape(_HTML_TAG.sub("", _HTML_SKIP.sub("", page)))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def file_documents(paths, transform=None):
    """One document per file (``.gz`` read through gzip, ``transform`` applied); empty ones skipped.
    ``paths`` is de-duplicated by real path (packages link the same pages under several folders)."""
    for path in sorted({os.path.realpath(p) for p in paths}):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        text = (transform(text) if transform else text).strip()
        if text:
            yield text


def glue_train_documents(data_root: Path):
    """The training sentences of the four GLUE tasks, labels dropped: one sentence, one document."""
    for task, cols in GLUE_TRAIN.items():
        path = data_root / "glue" / task / "train.tsv"
        if not path.is_file():
            raise MegaGPTError(f"{path}: missing (the GLUE training file for {task})")
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for lineno, row in enumerate(rows, start=2):
                for c in cols:
                    if row.get(c) is None:
                        raise MegaGPTError(f"{path}:{lineno}: no column {c!r}")
                    if row[c].strip():
                        yield row[c].strip()


def write_jsonl(path: Path, docs) -> dict:
    """Write documents as ``{"text": ...}`` lines (published atomically); returns counts."""
    n = words = 0
    lines = []
    for d in docs:
        lines.append(json.dumps({"text": d}, ensure_ascii=False))
        n += 1
        words += len(d.split())
    write_text_atomic(path, "\n".join(lines) + "\n")
    return {"documents": n, "words": words}


def download(debs: Path, packages) -> dict:
    """``apt-get download`` each package missing from ``debs``; returns {package: deb path}."""
    debs.mkdir(parents=True, exist_ok=True)
    found = {}
    for pkg in packages:
        have = sorted(debs.glob(f"{pkg}_*.deb"))
        if not have:
            r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            have = sorted(debs.glob(f"{pkg}_*.deb"))
            if r.returncode or not have:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise MegaGPTError(f"apt-get download {pkg} failed: {last}")
        found[pkg] = have[-1]
    return found


def build_corpus(out: Path, data_root: Path, debs: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = download(debs or out / "debs", PACKAGES)
    manifest = {"packages": {}, "files": {}}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for pkg, deb in files.items():
            subprocess.run(["dpkg-deb", "-x", str(deb), os.path.join(tmp, pkg)], check=True)
            manifest["packages"][pkg] = {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
        root = Path(tmp)
        with gzip.open(root / "dict-gcide/usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8",
                       errors="replace") as f:
            gcide = f.read()
        wn = [root / f"wordnet-base/usr/share/wordnet/data.{p}" for p in ("noun", "verb", "adj", "adv")]
        sources = {
            "gcide": gcide_documents(gcide),
            "wordnet": wordnet_documents(wn),
            "python_docs": file_documents(glob.glob(f"{tmp}/python3.11-doc/**/_sources/**/*.rst.txt",
                                                    recursive=True)),
            "linux_docs": file_documents(p for p in glob.glob(f"{tmp}/linux-doc-6.1/**/*.rst.gz", recursive=True)
                                         if "/translations/" not in p),
            "perl_docs": file_documents(glob.glob(f"{tmp}/perl-doc/**/*.pod", recursive=True)),
            "postgresql_docs": file_documents(glob.glob(f"{tmp}/postgresql-doc-15/**/*.html", recursive=True),
                                              html_text),
            "git_docs": file_documents(glob.glob(f"{tmp}/git-doc/**/*.txt", recursive=True)),
        }
        for name, docs in sources.items():
            manifest["files"][name] = write_jsonl(out / f"{name}.jsonl", docs)
            print(f"{name}: {manifest['files'][name]}", flush=True)
    manifest["files"]["glue_train"] = write_jsonl(out / "glue_train.jsonl", glue_train_documents(data_root))
    print(f"glue_train: {manifest['files']['glue_train']}", flush=True)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


@cli_main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSONL files and manifest.json")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                   help="holds glue/ (default: %(default)s)")
    p.add_argument("--debs", default=None, help="folder of downloaded .deb files to reuse (default: OUT/debs)")
    a = p.parse_args()
    build_corpus(Path(a.out), Path(a.data_root), Path(a.debs) if a.debs else None)


if __name__ == "__main__":
    main()
