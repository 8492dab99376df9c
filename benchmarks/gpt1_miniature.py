"""GPT-1 in miniature, on a CPU: does generative pretraining transfer? (the paper's Table 5 and Figure 2)

One script, stage by stage (each stage's output is kept in ``--out`` and reused on a rerun, so an
interrupted study resumes where it stopped; ``results.json`` is rewritten after every run):

1. corpus: ``benchmarks/gpt1_corpus.py`` (English text Debian ships + GLUE training sentences
   without labels; about 33M tokens). ``--quick``: tinyshakespeare + the GLUE sentences instead.
2. tokenizer: sentencepiece BPE trained on a sample of the corpus; shards by
   ``megagpt.data.preprocess``, one prefix per source.
3. pretraining: the real entry, ``megagpt/train/pretrain.py`` (DeepSpeed engine, one process), on
   a weighted blend of the sources (the in-domain GLUE text up-weighted to ``--in-domain-weight``),
   a GPT-1-style model (post-LN, GELU, learned positions, tied head), saving every
   ``--save-interval`` steps; ``tools/report.py`` writes its run report.
4. Figure 2 right: GPT-1's zero-shot heuristics (``megagpt.eval.zeroshot``) at the random init and
   at every saved checkpoint.
5. Table 5: ``megagpt.finetune.loop.finetune`` on SST-2, RTE, MRPC, STS-B, pretrained vs random
   init, λ = 0.5 vs 0, for each seed; the score is the dev metric after the last epoch (no
   selection on dev): accuracy, MRPC F1, STS-B Pearson x 100, averaged as the paper's "Avg".
6. Figure 2 left: SST-2 and RTE when only the embeddings and the first k blocks are transferred
   (``finetune.transfer_layers``), k = 0 .. n_layer.
7. ``report.md`` (tables), ``fig2_right.png``, ``fig2_left.png``.

    OMP_NUM_THREADS=2 python benchmarks/gpt1_miniature.py --out /tmp/gpt1 [--quick]
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpt1_corpus import build_corpus, glue_train_documents, write_jsonl  # noqa: E402
from megagpt.atomic import write_text_atomic  # noqa: E402
from megagpt.errors import MegaGPTError, cli_main  # noqa: E402

TASK_METRIC = {"sst2": "accuracy", "rte": "accuracy", "mrpc": "f1", "stsb": "pearson"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """``results.json``: every finished run, rewritten atomically after each (a rerun skips them).
    Worker processes (``--jobs``) share it: each write re-reads the file under a lock first."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()

    def _read(self):
        return json.loads(self.path.read_text()) if self.path.is_file() else {"runs": []}

    def find(self, **key):
        return next((r for r in self.data["runs"] if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: dict):
        with self._lock():
            self.data["runs"] = self._read()["runs"] + [row]
            write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def save(self):
        with self._lock():
            self.data["runs"] = self._read()["runs"]
            write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def _lock(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            with open(f"{self.path}.lock", "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                yield
        return held()


# ------------------------------------------------------------------------------------------- stages
def corpus_stage(out: Path, a) -> list[Path]:
    cdir = out / "corpus"
    if not (cdir / "manifest.json").is_file():
        if a.quick:   # no download: a small general part and the in-domain sentences
            cdir.mkdir(parents=True, exist_ok=True)
            text = (Path(a.data_root) / "corpus" / "tinyshakespeare.txt").read_text()
            paras = [p.strip() for p in text.split("\n\n") if p.strip()]
            files = {"shakespeare": write_jsonl(cdir / "shakespeare.jsonl", paras),
                     "glue_train": write_jsonl(cdir / "glue_train.jsonl", glue_train_documents(Path(a.data_root)))}
            write_text_atomic(cdir / "manifest.json", json.dumps({"files": files}, indent=2))
        else:
            build_corpus(cdir, Path(a.data_root), Path(a.debs) if a.debs else None)
    return sorted(cdir.glob("*.jsonl"))


def shards_stage(out: Path, files, a):
    """Tokenizer + one shard prefix per source → (tokenizer path, {source: (prefix, tokens)})."""
    from megagpt.data.preprocess import preprocess
    from megagpt.tokenizer import train_sentencepiece

    tok = out / "tok" / f"sp{a.vocab}.model"
    if not tok.is_file():
        train_sentencepiece([str(f) for f in files], str(tok)[:-6], vocab_size=a.vocab,
                            input_sentence_size=a.tokenizer_sentences, num_threads=2)
    sources = {}
    counts_file = out / "shards" / "tokens.json"
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    for f in files:
        name = f.name[: -len(".jsonl")]
        prefix = out / "shards" / name
        if name not in counts:
            counts[name] = preprocess([str(f)], str(prefix), str(tok), workers=2, replace=True).tokens
            write_text_atomic(counts_file, json.dumps(counts, indent=1))
        sources[name] = (f"{prefix}_text_document", counts[name])
    log("corpus tokens: " + ", ".join(f"{k} {v[1]:,}" for k, v in sources.items())
        + f"; total {sum(v[1] for v in sources.values()):,}")
    return str(tok), sources


def blend(sources: dict, in_domain_weight: float) -> list:
    """data_path: general sources by their size, the GLUE sentences at ``in_domain_weight`` of all samples."""
    general = {k: v for k, v in sources.items() if k != "glue_train"}
    total = sum(t for _, t in general.values())
    path = []
    for _, (prefix, tokens) in sorted(general.items()):
        path += [round((1 - in_domain_weight) * tokens / total, 6), prefix]
    return path + [in_domain_weight, sources["glue_train"][0]]


def model_overrides(a) -> dict:
    return {"n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head, "ffn_hidden": 4 * a.n_embd,
            "max_seq_len": a.seq_length}


def pretrain_stage(out: Path, tok: str, sources: dict, a) -> Path:
    save = out / "pretrain"
    cfg = {"model": {"preset": "gpt1", **model_overrides(a)},
           "data": {"data_path": blend(sources, a.in_domain_weight), "tokenizer": tok, "split": "995,5,0",
                    "seq_length": a.seq_length},
           "train": {"micro_batch_size": a.batch, "train_iters": a.steps, "lr": a.pretrain_lr,
                     "min_lr": a.pretrain_lr / 10, "lr_warmup_iters": max(1, a.steps // 50),
                     "log_interval": max(1, a.steps // 100), "eval_interval": max(1, a.steps // 10),
                     "eval_iters": 4, "save_interval": a.save_interval, "progress_bar": False,
                     "tensorboard_dir": str(save / "tensorboard")}}
    cfg_path = out / "pretrain.yaml"
    write_text_atomic(cfg_path, yaml.safe_dump(cfg))
    from megagpt.checkpoint.tags import complete_tags
    if save.is_dir() and any(s == a.steps for s, _ in complete_tags(save)):
        if not (save / "report.html").is_file():
            run_report(save)
        return save
    cmd = [sys.executable, str(REPO / "megagpt/train/pretrain.py"), "--config", str(cfg_path),
           "--deepspeed_config", str(REPO / "ds_configs/zero1.json"), "--save", str(save)]
    if save.is_dir() and complete_tags(save):
        cmd += ["--load", str(save)]   # an interrupted pretraining resumes
    log("pretrain: " + " ".join(cmd))
    t0 = time.time()
    with open(out / "pretrain.log", "a") as logf:
        r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode:
        raise MegaGPTError(f"pretraining failed (exit {r.returncode}); see {out / 'pretrain.log'}")
    log(f"pretrain done in {time.time() - t0:.0f}s")
    run_report(save)
    return save


def run_report(save: Path):
    """tools/report.py's page of the pretraining run (loss, LR, throughput, MFU against steps)."""
    subprocess.run([sys.executable, str(REPO / "tools/report.py"), str(save)], check=False, stdout=subprocess.DEVNULL)


def zero_shot_stage(res: Results, save: Path, tok: str, a):
    """Figure 2 right: the heuristics at the random init (step 0) and at every saved checkpoint."""
    import torch

    from megagpt.checkpoint import load_model
    from megagpt.checkpoint.tags import complete_tags
    from megagpt.eval.zeroshot import gpt1_zero_shot
    from megagpt.model import GPT, get_preset
    from megagpt.tokenizer import load_tokenizer

    points = [(0, None)] + complete_tags(save)
    for step, tag in points:
        if res.find(kind="zeroshot", step=step):
            continue
        t0 = time.time()
        if tag is None:
            tokenizer = load_tokenizer(tok)
            torch.manual_seed(a.seed)
            model = GPT(get_preset("gpt1", vocab_size=tokenizer.vocab_size, **model_overrides(a)))
        else:
            model, tokenizer, _ = load_model(save, tag=tag)
        scores = gpt1_zero_shot(model, tokenizer, a.data_root, limit=a.eval_limit)
        res.add({"kind": "zeroshot", "step": step, **scores, "seconds": round(time.time() - t0, 1)})
        log(f"zero-shot step {step}: {scores}")


def finetune_run(res: Results, key: dict, a, tok: str, save: Path, **extra):
    from megagpt.config import FinetuneConfig
    from megagpt.finetune.loop import finetune

    t0 = time.time()
    task = key["task"]
    fresh = key["init"] != "pretrained"   # the overrides shape a random model only (a checkpoint has its own)
    cfg = FinetuneConfig(task=task, data_root=a.data_root, init="random" if fresh else str(save),
                         preset="gpt1", model_overrides=model_overrides(a) if fresh else {}, tokenizer=tok, lr=a.ft_lr,
                         batch_size=a.ft_batch, epochs=a.ft_epochs, lm_coef=key["lm_coef"], seed=key["seed"],
                         train_limit=a.train_limit.get(task), eval_limit=a.eval_limit, log_interval=0, **extra)
    out = finetune(cfg, log=lambda m: None)
    last = out["history"][-1]
    row = {**key, "score": 100 * last[TASK_METRIC[task]], "train_loss": last["train_loss"],
           "metrics": {k: last[k] for k in ("accuracy", "f1", "pearson", "spearman") if k in last},
           "seconds": round(time.time() - t0, 1)}
    res.add(row)
    log(json.dumps(row))


def finetune_plan(a) -> list[tuple[dict, dict]]:
    """Every finetuning run of the study as (key, extra FinetuneConfig fields), in a fixed order:
    Table 5 seed-major (an interrupted study stays balanced), then Figure 2 left."""
    plan = []
    if "table5" not in a.skip:
        plan += [({"kind": "table5", "task": task, "init": init, "lm_coef": lm, "seed": seed}, {})
                 for seed, task, (init, lm) in itertools.product(a.seeds, a.tasks, a.arms)]
    if "layers" not in a.skip:   # k = n_layer is the Table 5 run with the same seed and λ
        plan += [({"kind": "layers", "task": task, "init": "pretrained", "lm_coef": 0.5, "seed": seed, "layers": k},
                  {"transfer_layers": k})
                 for seed, task, k in itertools.product(a.layer_seeds, a.layer_tasks, range(a.n_layer))]
    return plan


def finetune_stage(res, a, tok, save):
    """Run the plan here, or (``--jobs N``) in N worker processes of this script, each taking every
    N-th run with ``OMP_NUM_THREADS`` split between them (small models use two single-thread
    processes better than one two-thread one)."""
    plan = finetune_plan(a)
    if a.worker is not None:
        k, n = a.worker
        plan = plan[k::n]
    elif a.jobs > 1:
        threads = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)) // a.jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = [subprocess.Popen([sys.executable, *sys.argv, "--worker", f"{k}/{a.jobs}"], env=env)
                 for k in range(a.jobs)]
        failed = [k for k, p in enumerate(procs) if p.wait()]
        if failed:
            raise MegaGPTError(f"finetuning worker(s) {failed} failed; rerun to resume (finished runs are kept)")
        plan = []   # the workers ran it
    for key, extra in plan:
        if not res.find(**key):
            finetune_run(res, key, a, tok, save, **extra)
    res.data = res._read()


# ------------------------------------------------------------------------------------------ report
def mean_spread(xs):
    return statistics.mean(xs), (max(xs) - min(xs)) / 2


def layer_scores(runs, a, task):
    """Figure 2 left for one task: ({k blocks transferred: scores}, random-init scores), λ = 0.5,
    the layer seeds; k = n_layer is the Table 5 pretrained run."""
    def table5(init):
        return [r["score"] for r in runs if r["kind"] == "table5" and r["task"] == task and r["init"] == init
                and r["lm_coef"] == 0.5 and r["seed"] in a.layer_seeds]
    by_k = {k: [r["score"] for r in runs if r["kind"] == "layers" and r["task"] == task and r["layers"] == k]
            for k in range(a.n_layer)}
    by_k[a.n_layer] = table5("pretrained")
    return by_k, table5("random")


def report(res: Results, out: Path, a, sources, started) -> str:
    runs = res.data["runs"]
    lines = [f"corpus: {sum(t for _, t in sources.values()):,} tokens ("
             + ", ".join(f"{k} {t:,}" for k, (_, t) in sources.items()) + ")", ""]
    # Table 5
    head = "| init | aux LM (λ) | " + " | ".join(f"{t.upper()} ({TASK_METRIC[t]})" for t in a.tasks) + " | Avg |"
    lines += ["Table 5 miniature (dev, last epoch; mean ± half the spread over seeds "
              + ", ".join(map(str, a.seeds)) + ")", "", head, "|" + "---|" * (len(a.tasks) + 3)]
    avgs = {}
    for init, lm in a.arms:
        cells, per_seed = [], {}
        for t in a.tasks:
            rows = [r for r in runs if r["kind"] == "table5" and (r["task"], r["init"], r["lm_coef"]) == (t, init, lm)]
            for r in rows:
                per_seed.setdefault(r["seed"], []).append(r["score"])
            cells.append("–" if not rows else "%.1f ± %.1f" % mean_spread([r["score"] for r in rows]))
        seed_avgs = [statistics.mean(v) for v in per_seed.values() if len(v) == len(a.tasks)]
        avgs[(init, lm)] = seed_avgs
        avg = "%.1f ± %.1f" % mean_spread(seed_avgs) if seed_avgs else "–"
        lines.append(f"| {init} | {lm} | " + " | ".join(cells) + f" | {avg} |")
    p, r_ = avgs.get(("pretrained", 0.5)), avgs.get(("random", 0.5))
    if p and r_:
        gap = statistics.mean(p) - statistics.mean(r_)
        spread = max(max(p) - min(p), max(r_) - min(r_))
        lines += ["", f"pretrained − random (λ = 0.5), average: {gap:+.1f} points; largest seed spread of either "
                      f"arm {spread:.1f}; per-seed averages pretrained {[round(x, 1) for x in p]}, "
                      f"random {[round(x, 1) for x in r_]}"]
    # zero-shot
    zs = sorted((r for r in runs if r["kind"] == "zeroshot"), key=lambda r: r["step"])
    if zs:
        lines += ["", "Zero-shot heuristics (Figure 2 right)", "", "| step | SST-2 | COPA | Story Cloze |",
                  "|---|---|---|---|"]
        lines += [f"| {r['step']} | {100 * r['sst2']:.1f} | {100 * r['copa']:.1f} | {100 * r['storycloze']:.1f} |"
                  for r in zs]
    ly = [r for r in runs if r["kind"] == "layers"]
    if ly:
        lines += ["", "Layers transferred (Figure 2 left; λ = 0.5, mean over seeds "
                  + ", ".join(map(str, a.layer_seeds)) + ")", "",
                  "| task | " + " | ".join(map(str, range(a.n_layer + 1))) + " | random init |",
                  "|---|" + "---|" * (a.n_layer + 2)]
        for t in a.layer_tasks:
            by_k, rnd = layer_scores(runs, a, t)
            cells = ["%.1f" % statistics.mean(by_k[k]) if by_k.get(k) else "–" for k in range(a.n_layer + 1)]
            rnd_cell = f"{statistics.mean(rnd):.1f}" if rnd else "–"
            lines.append(f"| {t} | " + " | ".join(cells) + f" | {rnd_cell} |")
    lines += ["", f"wall time of this invocation: {time.time() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", text)
    plots(runs, out, a)
    return text


def finish(fig, ax, xlabel, ylabel, title, path):
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(runs, out: Path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = sorted((r for r in runs if r["kind"] == "zeroshot"), key=lambda r: r["step"])
    if zs:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in zs]
        for key, name in (("sst2", "SST-2 (' very' → positive/negative)"), ("copa", "COPA (mean token log-prob)"),
                          ("storycloze", "Story Cloze (mean token log-prob)")):
            ax.plot(steps, [100 * r[key] for r in zs], marker="o", label=name)
        ax.axhline(50, color="grey", ls=":", lw=1, label="chance")
        finish(fig, ax, "pretraining step", "zero-shot dev accuracy (%)", "Zero-shot heuristics during pretraining",
               out / "fig2_right.png")
    ly = [r for r in runs if r["kind"] == "layers"]
    if ly:
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in a.layer_tasks:
            by_k, rnd = layer_scores(runs, a, t)
            xs = [k for k in range(a.n_layer + 1) if by_k.get(k)]
            line, = ax.plot(xs, [statistics.mean(by_k[k]) for k in xs], marker="o",
                            label=f"{t.upper()} (pretrained, first k blocks)")
            if rnd:
                ax.axhline(statistics.mean(rnd), color=line.get_color(), ls="--", lw=1,
                           label=f"{t.upper()} random init")
        finish(fig, ax, "blocks transferred (0 = embeddings only)", "dev accuracy (%)", "Transferring more layers",
               out / "fig2_left.png")


# -------------------------------------------------------------------------------------------- main
@cli_main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--out", default="/tmp/megagpt_gpt1", help="work folder; its stages are reused (default: %(default)s)")
    arg("--quick", action="store_true", help="tiny sizes and no download: checks the whole script (~1 min)")
    arg("--data-root", default=str(REPO.parent / "shared" / "data"),
        help="glue/, copa/, storycloze/ (default: %(default)s)")
    arg("--debs", default=None, help="already downloaded .deb files for the corpus (default: OUT/corpus/debs)")
    arg("--vocab", type=int, default=8000, help="sentencepiece vocabulary (default: %(default)s)")
    arg("--tokenizer-sentences", type=int, default=400000, help="sentences sampled to train it (default: %(default)s)")
    arg("--n-layer", type=int, default=4)
    arg("--n-embd", type=int, default=192)
    arg("--n-head", type=int, default=3)
    arg("--seq-length", type=int, default=128)
    arg("--steps", type=int, default=2000, help="pretraining steps (default: %(default)s)")
    arg("--batch", type=int, default=32, help="pretraining sequences per step (default: %(default)s)")
    arg("--pretrain-lr", type=float, default=1e-3)
    arg("--save-interval", type=int, default=250, help="pretraining checkpoint every N steps (default: %(default)s)")
    arg("--in-domain-weight", type=float, default=0.2, help="share of pretraining samples from the GLUE training "
                                                            "sentences (default: %(default)s)")
    arg("--seed", type=int, default=1234, help="pretraining seed")
    arg("--arms", nargs="+", default=["pretrained:0.5", "pretrained:0", "random:0.5"],
        help="INIT:λ finetuning arms of Table 5 (INIT pretrained or random; default: the paper's rows, %(default)s)")
    arg("--tasks", nargs="+", default=["sst2", "rte", "mrpc", "stsb"], choices=sorted(TASK_METRIC))
    arg("--seeds", nargs="+", type=int, default=[0, 1, 2], help="finetuning seeds (default: %(default)s)")
    arg("--train-limit", nargs="+", default=["sst2=2000", "rte=1000", "mrpc=1500", "stsb=1500"],
        help="TASK=N: first N training examples (default: %(default)s)")
    arg("--eval-limit", type=int, default=None, help="first N dev examples (default: all)")
    arg("--ft-lr", type=float, default=2.5e-4)
    arg("--ft-batch", type=int, default=32)
    arg("--ft-epochs", type=int, default=3)
    arg("--layer-tasks", nargs="+", default=["sst2", "rte"], choices=sorted(TASK_METRIC))
    arg("--layer-seeds", nargs="+", type=int, default=[0])
    arg("--jobs", type=int, default=1, help="finetuning runs in this many processes at once (default: %(default)s)")
    arg("--worker", default=None, help=argparse.SUPPRESS)   # K/N: a --jobs worker's share
    arg("--skip", nargs="*", default=[], choices=("zeroshot", "table5", "layers"), help="stages to leave out")
    a = p.parse_args()
    if a.quick:
        a.vocab, a.tokenizer_sentences, a.n_layer, a.n_embd, a.n_head, a.seq_length = 600, 20000, 2, 32, 2, 64
        a.steps, a.batch, a.save_interval, a.seeds, a.layer_seeds = 8, 8, 4, [0], [0]
        a.train_limit, a.eval_limit, a.ft_epochs, a.tasks = ["sst2=32", "rte=16", "mrpc=16", "stsb=16"], 16, 1, a.tasks
    try:
        a.train_limit = {k: int(v) for k, v in (x.split("=", 1) for x in a.train_limit)}
    except ValueError:
        raise MegaGPTError(f"--train-limit {' '.join(a.train_limit)}: expected TASK=N items") from None
    try:
        a.arms = [(i, float(l)) for i, l in (x.split(":", 1) for x in a.arms)]
        assert all(i in ("pretrained", "random") for i, _ in a.arms)
    except (ValueError, AssertionError):
        raise MegaGPTError(f"--arms {' '.join(a.arms)}: expected INIT:λ items, INIT pretrained or random") from None
    if a.worker is not None:
        a.worker = tuple(int(x) for x in a.worker.split("/"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    files = corpus_stage(out, a)
    tok, sources = shards_stage(out, files, a)
    save = pretrain_stage(out, tok, sources, a)
    res = Results(out / "results.json")
    if a.worker is None:
        res.data["settings"] = {k: v for k, v in vars(a).items() if k != "worker"}
        res.save()
    if a.worker is not None:
        finetune_stage(res, a, tok, save)
        return
    if "zeroshot" not in a.skip:
        zero_shot_stage(res, save, tok, a)
    finetune_stage(res, a, tok, save)
    print(report(res, out, a, sources, started))


if __name__ == "__main__":
    main()
