"""Offline datasets for the task YAMLs beside this file (``custom_dataset: !function utils.load``).

lm-eval calls ``load(**metadata, **dataset_kwargs)``; ``dataset_kwargs`` names the ``task``, the
metadata may carry ``data_dir``. The files are read with megagpt's finetuning readers (COPA XML,
Story Cloze CSV, GLUE TSV: the same ``file:line`` errors as finetuning) and turned into one shape,
``{"context", "choices", "label"}`` (``{"context", "target"}`` for LAMBADA), in memory: nothing is
downloaded, nothing cached. The data directory: ``data_dir`` (``tools/evaluate.py --data-dir``),
else ``$MEGAGPT_EVAL_DATA``, else ``../shared/data`` beside the checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

from megagpt.errors import MegaGPTError

DATA_ENV = "MEGAGPT_EVAL_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"

# the file each task reads, relative to the data directory
FILES = {"copa": "copa/copa-dev.xml", "storycloze": "storycloze/val.csv", "sst2": "glue/SST-2/dev.tsv",
         "rte": "glue/RTE/dev.tsv", "mrpc": "glue/MRPC/dev.tsv", "lambada": "corpus/tinyshakespeare.txt"}
# COPA as lm-eval's SuperGLUE prompt has it: the premise, a connective, the alternative as its clause
COPA_CONNECTIVE = {"cause": "because", "effect": "therefore"}


def resolve_data_dir(given=None) -> Path:
    d = Path(given or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not d.is_dir():
        how = "--data-dir" if given else (f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the default")
        raise MegaGPTError(f"{d}: evaluation data directory not found ({how}); pass --data-dir DIR or set "
                           f"{DATA_ENV} to the folder holding copa/, storycloze/, glue/ and corpus/")
    return d


def _copa(path):
    from megagpt.finetune.readers import COPA_QUESTIONS, read_copa

    out = []
    for ex in read_copa(path)[0]:
        asks = next(a for a, q in COPA_QUESTIONS.items() if ex.texts[0].endswith(" " + q))
        premise = ex.texts[0][: -len(COPA_QUESTIONS[asks]) - 1].rstrip(".!?")
        choices = [c[:1].lower() + c[1:] for c in ex.choices]
        out.append({"context": f"{premise} {COPA_CONNECTIVE[asks]}", "choices": choices, "label": ex.label})
    return out


def _storycloze(path):
    from megagpt.finetune.readers import read_storycloze

    return [{"context": ex.texts[0], "choices": [c.strip() for c in ex.choices], "label": ex.label}
            for ex in read_storycloze(path)[0]]


def _glue(task):
    def read(path):
        from megagpt.finetune.readers import read_glue

        examples = read_glue(path, task)[0]
        if task == "sst2":
            return [{"context": f"{ex.texts[0].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                     "choices": ["negative", "positive"], "label": ex.label} for ex in examples]
        if task == "rte":   # the reader's label is 1 for entailment; the answer "True" is choice 0
            return [{"context": f"{a}\nQuestion: {b} True or False?\nAnswer:", "choices": ["True", "False"],
                     "label": 1 - ex.label} for ex in examples for a, b in [ex.texts]]
        return [{"context": f"Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?"
                            f"\nAnswer:", "choices": ["no", "yes"], "label": ex.label}
                for ex in examples for a, b in [ex.texts]]
    return read


def _lambada(path):
    from megagpt.eval.lambada import read_lambada

    return read_lambada(path)


READERS = {"copa": _copa, "storycloze": _storycloze, "sst2": _glue("sst2"), "rte": _glue("rte"),
           "mrpc": _glue("mrpc"), "lambada": _lambada}


def load(task=None, data_dir=None, lambada_text=None, **_metadata):
    """The task's documents as a ``datasets.DatasetDict`` with one ``validation`` split.
    ``lambada_text``: the held-back text LAMBADA passages are cut from (default: tinyshakespeare)."""
    import datasets

    if task not in READERS:
        raise MegaGPTError(f"dataset_kwargs task={task!r}: expected one of {', '.join(READERS)}")
    path = Path(lambada_text) if task == "lambada" and lambada_text else resolve_data_dir(data_dir) / FILES[task]
    if not path.is_file():
        raise MegaGPTError(f"{path}: no such file (task {task}_local)")
    docs = READERS[task](path)
    if not docs:
        raise MegaGPTError(f"{path}: no documents for task {task}_local")
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})
