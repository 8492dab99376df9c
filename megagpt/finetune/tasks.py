"""The finetuning tasks: which reader, which input transform, which head, which metric."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megagpt.errors import MegaGPTError

from . import readers, transforms


@dataclass(frozen=True)
class Task:
    name: str
    kind: str               # classification | entailment | similarity | multiple_choice
    num_outputs: int        # classes (1 = regression for similarity, 1 score per choice for MC)
    regression: bool
    metric_kind: str        # see metrics.compute
    main_metric: str        # the metric that picks the best checkpoint
    train_file: str         # relative to the data root (../shared/data)
    eval_file: str | None = None   # None: only one file ships, split it (readers.split_examples)

    def read(self, path, skip_bad=False):
        if self.name in readers.GLUE_FORMATS:
            return readers.read_glue(path, self.name, skip_bad)
        return {"copa": readers.read_copa, "storycloze": readers.read_storycloze}[self.name](path, skip_bad)

    def load(self, data_root, skip_bad=False, train_fraction=0.8, log=print):
        """(train examples, eval examples) from the files under ``data_root``; skipped rows logged."""
        sets = []
        for name in [self.train_file] if self.eval_file is None else [self.train_file, self.eval_file]:
            examples, stats = self.read(Path(data_root) / name, skip_bad)
            if stats.skipped:
                log(f"{stats.path}: skipped {stats.skipped} bad row(s) of {stats.rows} "
                    f"(first: {', '.join(stats.skipped_where[:3])})")
            sets.append(examples)
        return readers.split_examples(sets[0], train_fraction) if self.eval_file is None else tuple(sets)


TASKS = {t.name: t for t in [
    Task("sst2", "classification", 2, False, "accuracy", "accuracy", "glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"),
    Task("rte", "entailment", 2, False, "accuracy", "accuracy", "glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
    Task("mrpc", "similarity", 2, False, "accuracy_f1", "f1", "glue/MRPC/train.tsv", "glue/MRPC/dev.tsv"),
    Task("stsb", "similarity", 1, True, "correlation", "pearson", "glue/STS-B/train.tsv", "glue/STS-B/dev.tsv"),
    Task("copa", "multiple_choice", 1, False, "accuracy", "accuracy", "copa/copa-dev.xml"),
    Task("storycloze", "multiple_choice", 1, False, "accuracy", "accuracy", "storycloze/val.csv"),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MegaGPTError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def encode(task: Task, ex: readers.Example, tokenize, sp: transforms.SpecialIds, seq_length: int) -> list[list[int]]:
    """The token sequences ("views") of one example under the task's GPT-1 transform (``tokenize``:
    str → ids): 1 for classification/entailment, 2 for similarity, K for multiple choice."""
    t = [tokenize(x) for x in ex.texts]
    if task.kind == "multiple_choice":
        return transforms.multiple_choice(t[0], [tokenize(c) for c in ex.choices], sp, seq_length)
    transform = {"classification": transforms.classification, "entailment": transforms.entailment,
                 "similarity": transforms.similarity}[task.kind]
    return transform(*t, sp, seq_length)   # x, or (premise, hypothesis) / (a, b)
