"""The GPT-1 miniature study's parts: layer transfer in finetuning, the zero-shot heuristics, the
corpus builder, and the whole study script in ``--quick`` mode."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from megagpt.errors import MegaGPTError  # noqa: E402


# ------------------------------------------------------------------------------ transfer_layers
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sp_model):
    """A consolidated checkpoint of a 3-layer model whose weights are far from any init (+0.5)."""
    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    cfg = get_preset("tiny", vocab_size=load_tokenizer(sp_model).vocab_size, n_layer=3, max_seq_len=64)
    torch.manual_seed(7)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_consolidated(tmp_path_factory.mktemp("pre") / "ckpt", sd, cfg.to_dict(), tokenizer_path=sp_model)
    return path, sd


def _build(init, shared_data, **kw):
    from megagpt.config import FinetuneConfig
    from megagpt.finetune.loop import build_model
    from megagpt.finetune.tasks import get_task
    from megagpt.parallel.layout import seed_all
    from megagpt.tp import SERIAL

    cfg = FinetuneConfig(task="sst2", data_root=str(shared_data), init=str(init), **kw)
    cfg.validate()
    seed_all(cfg.seed)
    return build_model(cfg, get_task("sst2"), SERIAL)[0].gpt


@pytest.mark.parametrize("k", [0, 1, 3])
def test_transfer_layers_keeps_embeddings_and_first_k_blocks(pretrained, shared_data, k):
    path, ref = pretrained
    gpt = _build(path, shared_data, transfer_layers=k)
    std = gpt.cfg.init_std
    for name, p in gpt.state_dict().items():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if block is None or block < k:   # embeddings (and the tied head), blocks 0..k-1: the checkpoint's
            assert torch.equal(p, ref[name]), name
            continue
        assert not torch.equal(p, ref[name]), name   # a fresh block: the init's values, not the checkpoint's
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif p.dim() == 1:   # norm gains
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - std) < 0.3 * std or name.endswith("proj.weight"), name
            assert abs(p.mean().item()) < 0.1 * std, name


def test_transfer_layers_default_transfers_all(pretrained, shared_data):
    path, ref = pretrained
    gpt = _build(path, shared_data)
    assert all(torch.equal(v, ref[k]) for k, v in gpt.state_dict().items())


def test_transfer_layers_mistakes_name_the_key(pretrained, shared_data, sp_model):
    path, _ = pretrained
    with pytest.raises(MegaGPTError, match="transfer_layers=4 exceeds the checkpoint's 3 layers") as e:
        _build(path, shared_data, transfer_layers=4)
    assert e.value.key == "transfer_layers"
    with pytest.raises(MegaGPTError, match="needs a pretrained") as e:
        _build("random", shared_data, transfer_layers=1, tokenizer=sp_model)
    assert e.value.key == "transfer_layers"


# ------------------------------------------------------------------------------ zero-shot heuristics
@pytest.fixture(scope="module")
def lm(sp_model):
    from megagpt.eval.harness import MegaGPTLM
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_model)
    torch.manual_seed(3)
    model = GPT(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64))
    return MegaGPTLM(model=model, tok=tok, batch_size=3)


def _manual_logprobs(lm, context, continuation):
    """Log-probs of the continuation's tokens, computed one sequence at a time from the model."""
    whole = lm.tok.encode(context + continuation)
    n_ctx = len(lm.tok.encode(context))
    with torch.no_grad():
        logits = lm.model(torch.tensor([whole[:-1]]))[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))]


def test_average_logprob_choice_uses_the_mean_token_log_prob(lm):
    from megagpt.eval.zeroshot import average_logprob_choice, choice_means

    docs = [{"context": "The king spoke to his", "choices": ["son", "many loyal and devoted subjects of the realm"],
             "label": 0},
            {"context": "She opened the door because", "choices": ["it rained", "the bell rang twice", "no"],
             "label": 2},
            {"context": "First Citizen: We are accounted poor", "choices": ["citizens", "and rich"], "label": 1}]
    means = choice_means(lm, docs)
    for d, got in zip(docs, means):
        want = [sum(x) / len(x) for x in (_manual_logprobs(lm, d["context"], " " + c) for c in d["choices"])]
        assert got == pytest.approx(want, abs=1e-5)
    acc = average_logprob_choice(lm, docs)
    assert acc == sum(max(range(len(m)), key=m.__getitem__) == d["label"] for m, d in zip(means, docs)) / len(docs)


def test_sst2_very_compares_positive_and_negative_after_very(lm):
    from megagpt.eval.zeroshot import sst2_very

    sentences = ["a charming and often affecting journey .", "unflinchingly bleak and desperate",
                 "the acting is fine", "it 's a mess"]
    preds = []
    for s in sentences:
        pos, neg = (sum(_manual_logprobs(lm, f"{s} very", f" {w}")) for w in ("positive", "negative"))
        preds.append(int(pos > neg))
    assert sst2_very(lm, sentences, preds) == 1.0
    assert sst2_very(lm, sentences, [1 - p for p in preds]) == 0.0


def test_gpt1_zero_shot_reads_the_dev_files(shared_data, sp_model):
    from megagpt.eval.zeroshot import gpt1_zero_shot
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_model)
    torch.manual_seed(0)
    out = gpt1_zero_shot(GPT(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)), tok, shared_data,
                         limit=10)
    assert set(out) == {"sst2", "copa", "storycloze"}
    assert all(0 <= v <= 1 and (v * 10) == round(v * 10) for v in out.values())   # 10 examples each


# ------------------------------------------------------------------------------ corpus builder
GCIDE = """\
Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}; p. pr. & vb.
   n. {Affecting}.] [L. affectus.]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            The climate affected their health and spirits.
                                                  --Macaulay.
      [1913 Webster]

Affectation \\Af`fec*ta"tion\\, n.
   An attempt to assume what is not natural or real.
      [1913 Webster +PJC]
"""


def test_gcide_entries_are_cleaned_documents():
    from gpt1_corpus import gcide_documents

    docs = list(gcide_documents(GCIDE))
    assert len(docs) == 2
    assert docs[0].startswith("Affect , v. t. [imp. & p. p. Affected; p. pr. & vb. n. Affecting.]")
    assert "The climate affected their health and spirits. --Macaulay." in docs[0]
    assert docs[1] == "Affectation , n. An attempt to assume what is not natural or real."
    assert not any("Webster" in d or "\\" in d or "{" in d for d in docs)


def test_wordnet_glosses_and_html_text(tmp_path):
    from gpt1_corpus import html_text, wordnet_documents

    data = tmp_path / "data.adj"
    data.write_text("  1 This software and database is being provided\n"
                    "00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed by `to') having the "
                    "necessary means; \"able to swim\"\n"
                    "00002098 00 a 01 unable 0 002 | not having the necessary means\n")
    assert list(wordnet_documents([data], group=50)) == [
        "(usually followed by `to') having the necessary means; \"able to swim\"\nnot having the necessary means"]
    page = ("<html><head><title>t</title><style>p{}</style></head><body><script>x()</script>"
            "<p>Fish &amp; chips</p>\n\n\n<p>are <b>good</b></p></body></html>")
    assert html_text(page) == "Fish & chips\n\nare good"


def test_glue_sentences_come_from_training_files_only(shared_data):
    """Evaluation sets never enter pretraining: no dev sentence that is not also a training one."""
    from gpt1_corpus import GLUE_TRAIN, glue_train_documents

    docs = set(glue_train_documents(shared_data))
    for task, cols in GLUE_TRAIN.items():
        def column(split):
            with open(shared_data / "glue" / task / f"{split}.tsv", encoding="utf-8", newline="") as f:
                return {r[c].strip() for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) for c in cols}
        train, dev = column("train"), column("dev")
        assert train <= docs, task
        assert not (dev - train) & docs, task


def test_corpus_download_failure_is_one_line(tmp_path):
    from gpt1_corpus import download

    if not os.path.exists("/usr/bin/apt-get"):
        pytest.skip("no apt-get here")
    with pytest.raises(MegaGPTError, match="apt-get download no-such-package-megagpt failed"):
        download(tmp_path, ["no-such-package-megagpt"])


# ------------------------------------------------------------------------------ the whole study
@pytest.mark.slow
def test_study_quick_runs_every_stage_and_resumes(tmp_path, shared_data):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "benchmarks/gpt1_miniature.py"), "--quick", "--out", str(out),
           "--data-root", str(shared_data), "--jobs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}   # --jobs 2: two single-thread finetuning workers
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["runs"]
    zs = [x for x in res if x["kind"] == "zeroshot"]
    assert [x["step"] for x in zs] == [0, 4, 8]   # random init, then every saved checkpoint
    t5 = [x for x in res if x["kind"] == "table5"]
    assert len(t5) == 4 * 3   # 4 tasks x 3 arms x 1 seed
    assert {(x["init"], x["lm_coef"]) for x in t5} == {("pretrained", 0.5), ("pretrained", 0.0), ("random", 0.5)}
    assert all(math.isfinite(x["score"]) for x in t5)
    assert sorted(x["layers"] for x in res if x["kind"] == "layers") == [0, 0, 1, 1]   # sst2, rte; 2 layers
    report = (out / "report.md").read_text()
    for needle in ("Table 5 miniature", "| pretrained | 0.5 |", "Zero-shot heuristics", "Layers transferred"):
        assert needle in report
    for png in ("fig2_right.png", "fig2_left.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pretrain" / "report.html").is_file()   # tools/report.py on the pretraining run
    # a rerun finds every stage done: no new rows, no new pretraining
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["runs"] == res
    assert "pretrain:" not in r2.stdout
