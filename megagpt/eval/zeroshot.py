"""GPT-1's zero-shot heuristics (the paper's section 5, Figure 2 right), adapted to our tasks.

They ask a language model, with no finetuning, to pick an answer; evaluated at every saved
pretraining checkpoint they show whether generative pretraining is learning things the tasks
need. The paper's rules, as applied here:

* **SST-2**: append `` very`` to the sentence and compare the model's probabilities of
  `` positive`` and `` negative`` as the next word.
* **COPA** and **Story Cloze**: the ending (alternative) with the highest *average* token
  log-probability given the context wins (the paper's rule for RACE/Story Cloze: summed
  log-probability would favour short endings). COPA's context is the premise and its connective
  (``because`` / ``therefore``), as the ``copa_local`` lm-eval task has it.

Scoring goes through the lm-eval backend (``harness.MegaGPTLM``): the harness's context /
continuation tokenization and the batched log-likelihood that ``parity.py`` checks against
lm-eval's own HF backend.
"""
from __future__ import annotations

from pathlib import Path

from megagpt.eval.tasks.utils import FILES, READERS

TASKS = ("sst2", "copa", "storycloze")


def _scores(lm, pairs):
    """[(context, continuation)] → [(summed log-prob, continuation tokens)], in order."""
    enc = [lm._encode_pair(c, x) for c, x in pairs]
    sums = lm._loglikelihood_tokens([(None, c, x) for c, x in enc])
    return [(s, len(x)) for (s, _), (_, x) in zip(sums, enc)]


def sst2_very(lm, sentences: list[str], labels: list[int]) -> float:
    """Accuracy of "<sentence> very" → P(" positive") > P(" negative") (label 1 is positive)."""
    pairs = [(f"{s.strip()} very", f" {w}") for s in sentences for w in ("negative", "positive")]
    sc = _scores(lm, pairs)
    preds = [int(sc[2 * i + 1][0] > sc[2 * i][0]) for i in range(len(sentences))]
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def choice_means(lm, docs: list[dict]) -> list[list[float]]:
    """Per ``{"context", "choices", "label"}`` doc, each choice's mean token log-probability after the context."""
    pairs = [(d["context"], " " + c) for d in docs for c in d["choices"]]
    sc = iter(_scores(lm, pairs))
    return [[s / n for s, n in (next(sc) for _ in d["choices"])] for d in docs]


def average_logprob_choice(lm, docs: list[dict]) -> float:
    """Accuracy of choosing, per doc, the choice with the highest mean token log-probability."""
    means = choice_means(lm, docs)
    return sum(max(range(len(m)), key=m.__getitem__) == d["label"] for m, d in zip(means, docs)) / len(docs)


def gpt1_zero_shot(model, tok, data_root, limit: int | None = None, batch_size: int = 32) -> dict:
    """{task: accuracy} of the three heuristics on the dev files under ``data_root`` (first ``limit``
    examples each) for a live ``GPT`` and its tokenizer."""
    from megagpt.eval.harness import MegaGPTLM
    from megagpt.finetune.readers import read_glue

    lm = MegaGPTLM(model=model, tok=tok, batch_size=batch_size)
    root = Path(data_root)
    sst = read_glue(root / FILES["sst2"], "sst2")[0][:limit]
    out = {"sst2": sst2_very(lm, [e.texts[0] for e in sst], [int(e.label) for e in sst])}
    for task in ("copa", "storycloze"):
        out[task] = average_logprob_choice(lm, READERS[task](root / FILES[task])[:limit])
    return out
