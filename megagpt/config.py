"""The run config: one typed tree, built once from a YAML/JSON file plus command-line flags.

``load_config(path, overrides) -> MegaGPTConfig`` (pretraining) and ``load_finetune_config(path or None,
overrides) -> FinetuneConfig`` (its ``finetune:`` section). Defaults that depend on another section are
filled before it is built (``data.seq_length`` = ``model.max_seq_len``, ``model.vocab_size`` = the
tokenizer's, ``parallel.seed`` = ``train.seed``). A mistake is a ``MegaGPTError`` naming the key and where
its value came from (file and line, or flag), before any process group starts. The layout is checked
against the model here, against the world size and DeepSpeed JSON in ``pretrain.main``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import yaml

from megagpt.data.config import DataConfig
from megagpt.errors import MegaGPTError
from megagpt.model.config import ModelConfig
from megagpt.parallel.topology import ParallelConfig
from megagpt.schema import Section, field

__all__ = ["DataConfig", "DebugConfig", "FinetuneConfig", "MegaGPTConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "TrainConfig", "load_config", "load_finetune_config", "read_config_file"]


# ------------------------------------------------------------------------------ sections
@dataclass
class OptimConfig(Section):
    """AdamW and clipping: the same names, flags and DeepSpeed keys in pretraining and finetuning."""

    lr: float = field(2.5e-4, help="peak learning rate")
    weight_decay: float = field(0.01, min=0.0, help="AdamW weight decay on matmul weights (never on biases, norms "
                                                    "or embedding tables)")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    adam_eps: float = field(1e-8, help="AdamW epsilon")
    clip_grad: float = field(1.0, min=0.0, help="gradient-norm clipping threshold")

    def _check(self) -> None:
        if not self.lr > 0:
            raise MegaGPTError(f"lr={self.lr!r} must be > 0", key="lr")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise MegaGPTError(f"{name}={getattr(self, name)!r} must be in [0, 1)", key=name)
        if not self.adam_eps > 0:   # eps 0 divides by zero on the first update of an unused weight
            raise MegaGPTError(f"adam_eps={self.adam_eps!r} must be > 0", key="adam_eps")


def _refuse_files(section, names) -> None:
    """Directory settings that name an existing file: found only when the run first writes there."""
    for name in names:
        path = getattr(section, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise MegaGPTError(f"{path}: is a file, not a directory", key=name)


@dataclass
class TrainConfig(OptimConfig):
    micro_batch_size: int = field(4, min=1, help="samples per rank per micro-batch")
    gradient_accumulation_steps: int = field(1, min=1, help="micro-batches per optimizer step")
    global_batch_size: Optional[int] = field(None, min=1, help="if set, must equal micro x accumulation x "
                                                               "data-parallel size")
    train_iters: int = field(1000, min=1, help="optimizer steps in the run; sizes the sample stream and the LR "
                                               "schedule")
    min_lr: float = field(0.0, help="final learning rate after decay")
    lr_warmup_iters: int = field(0, min=0, help="linear warm-up steps")
    lr_decay_style: str = field("cosine", choices=("cosine", "linear", "constant"), help="decay after warm-up")
    lr_decay_iters: Optional[int] = field(None, min=1, help="steps to decay over", default_text="train_iters")
    seed: int = field(1234, help="seed of weights, dropout and data order")
    log_interval: int = field(10, min=1, help="log loss/throughput every N steps")
    eval_interval: int = field(100, min=0, help="validate every N steps, 0 = never")
    eval_iters: int = field(10, min=0, help="validation global batches per evaluation (eval_iters x the global "
                                             "batch samples: the same validation set at every layout)")
    save: Optional[str] = field(None, help="checkpoint directory")
    load: Optional[str] = field(None, help="resume from the newest complete checkpoint here")
    save_interval: int = field(0, min=0, help="save every N steps; 0 = only at the end / on SIGTERM or Ctrl-C / "
                                              "on NaN stop")
    keep_last: int = field(0, min=0, help="keep only the newest N checkpoints, 0 = all")
    checkpoint_fallback: bool = field(True, help="on resume, a newest tag whose files fail its manifest is renamed "
                                                 "<tag>.damaged and the previous complete tag is used (false: stop)")
    distributed_timeout_minutes: float = field(10.0, min=0.05, help="a collective that waits longer (a rank died "
                                                                   "or hangs) stops every rank with an error")
    exit_interval: int = field(0, min=0, help="save and exit 0 when step % N == 0 (stop early without changing "
                                              "train_iters, which sizes the sample stream and LR schedule)")
    tensorboard_dir: Optional[str] = field(None, help="tensorboard event directory",
                                           default_text="<save>/tensorboard when save is set")
    wandb_project: Optional[str] = field(None, help="also log the tensorboard scalars to this Weights & Biases "
                                                    "project (rank 0; WANDB_MODE=offline works without a network)")
    wandb_run_name: Optional[str] = field(None, help="the W&B run's display name", default_text="W&B's own")
    init_from: Optional[str] = field(None, help="start from these weights (HF transformers dir, consolidated or "
                                                "DeepSpeed checkpoint) with a fresh optimizer at step 0; a complete "
                                                "checkpoint in --load takes precedence (resume)")
    override_lr_schedule: bool = field(False, help="on resume, use this run's LR schedule settings even where they "
                                                   "differ from the checkpoint's (default: keep the checkpoint's "
                                                   "schedule and say which settings differ)")
    nan_policy: str = field("skip", choices=("skip", "stop"), help="on a non-finite loss or gradient: skip the "
                                                                   "update on every rank, or save the last good step "
                                                                   "and stop")
    spike_policy: str = field("none", choices=("none", "rollback"), help="on a loss spike: ignore it, or reload the "
                                                                         "last complete checkpoint and skip the "
                                                                         "spike's samples")
    spike_window: int = field(20, min=2, help="a spike is measured against the mean loss of this many previous steps")
    spike_factor: float = field(1.5, help="a loss above spike_factor x the window's mean loss is a spike")
    max_rollbacks: int = field(3, min=0, help="rollbacks allowed in a run; at the next spike the run stops")
    loss_chunk_tokens: int = field(0, min=0, help="compute the LM loss this many tokens at a time, recomputing "
                                                  "each chunk's logits in backward: the full-vocabulary logits never "
                                                  "exist at once (0 = all at once)")
    peak_tflops: Optional[float] = field(None, help="peak TFLOP/s per device for MFU in the run's dtype",
                                         default_text="datasheet on known GPUs; measured and cached on CPU")
    progress_bar: bool = field(True, help="tqdm progress bar")
    compile: bool = field(False, help="run each transformer block under torch.compile (fuses its elementwise "
                                      "chains; the first step's compile time is logged as compile_s, outside "
                                      "throughput); tensor_parallel=pipeline_parallel=1 only")
    eval_harness_tasks: list = field(default_factory=list, help="lm-evaluation-harness tasks of megagpt/eval/tasks "
                                     "(copa_local, lambada_local, ...) run on the gathered model by rank 0",
                                     default_text="[]")
    eval_harness_interval: int = field(0, min=0, help="run eval_harness_tasks every N steps and at the end, 0 = never")
    eval_harness_limit: Optional[int] = field(100, min=1, help="documents per task per harness evaluation",
                                              default_text="100; null = all")
    eval_harness_data_dir: Optional[str] = field(None, help="folder of the harness tasks' files",
                                                 default_text="$MEGAGPT_EVAL_DATA, else ../shared/data")
    deepspeed_config: Optional[str] = field(None, flags=("--deepspeed_config", "--deepspeed-config"),
                                            help="DeepSpeed JSON (ds_configs/*.json); \"auto\" values are filled "
                                                 "from this section")

    def _check(self) -> None:
        super()._check()
        if not 0 <= self.min_lr <= self.lr:
            raise MegaGPTError(f"min_lr={self.min_lr!r} must be in [0, lr={self.lr}]", key="min_lr")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise MegaGPTError(f"peak_tflops={self.peak_tflops!r} must be > 0", key="peak_tflops")
        if self.spike_factor <= 1:
            raise MegaGPTError(f"spike_factor={self.spike_factor!r} must be > 1", key="spike_factor")
        _refuse_files(self, ("save", "load", "tensorboard_dir"))
        if self.load and not os.path.exists(self.load) and not (self.save and os.path.realpath(self.save) ==
                                                                os.path.realpath(self.load)):
            raise MegaGPTError(f"{self.load}: no such directory (only a first run whose --load is its own --save "
                               f"starts without one)", key="load")   # a typo would restart the run silently
        known = sorted(f[:-5] for f in os.listdir(os.path.join(os.path.dirname(__file__), "eval", "tasks"))
                       if f.endswith(".yaml"))   # the task files themselves: config does not import megagpt.eval
        unknown = [t for t in self.eval_harness_tasks if t not in known]
        if unknown:
            raise MegaGPTError(f"eval_harness_tasks: unknown task(s) {unknown}; available: {', '.join(known)}",
                               key="eval_harness_tasks")

    def batch_sizes(self) -> dict:
        """The batch keyword arguments of ``megagpt.train.distributed.build_ds_config``."""
        return {"micro_batch_size": self.micro_batch_size, "global_batch_size": self.global_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps}


@dataclass
class DebugConfig(Section):
    """Test-only fault injection (megagpt/train/faults.py): each field deliberately breaks a run. No flags."""

    inject_nan_at_step: Optional[int] = field(None, cli=False, help="the loss of this step's last micro-batch "
                                                                    "becomes NaN on every rank")
    sigkill_in_save_at_step: Optional[int] = field(None, cli=False, help="rank 0 SIGKILLs itself after writing "
                                                   "this step's files but before marking it complete")
    dump_weights: bool = field(False, cli=False, help="rank 0 writes the gathered fp32 weights into each saved "
                                                      "tag as weights_at_save.pt")
    hang_at_step: Optional[int] = field(None, cli=False, help="the last rank stops responding at this step")
    kill_at_step: Optional[int] = field(None, cli=False, help="the last rank SIGKILLs itself at this step")
    spike_at_step: Optional[int] = field(None, cli=False, help="this step's loss (first attempt only) is x10: a "
                                                              "loss spike")
    nan_grad_at_step: Optional[int] = field(None, cli=False, help="rank 1's last parameter gets a NaN gradient at "
                                                                 "this step (the loss stays finite)")
    sample_ids: bool = field(False, cli=False, help="each rank appends the train-sample indices of every step to "
                                                    "samples_rank{R}.jsonl in the save dir")
    step_delay_s: float = field(0.0, min=0.0, cli=False, help="every step sleeps this long first: a slow run, so "
                                                             "a test's signal lands mid-run on any machine")


@dataclass
class FinetuneConfig(OptimConfig):
    """GPT-1 task finetuning (megagpt/finetune); the settings it shares with pretraining have the same names."""

    task: Optional[str] = field(None, help="sst2, rte, mrpc, stsb, copa or storycloze", default_text="required")
    data_root: str = field("../shared/data", help="folder holding glue/, copa/, storycloze/")
    init: str = field("random", help="'random', or a checkpoint dir: DeepSpeed pretraining, consolidated or HF")
    preset: str = field("tiny", help="model preset for init 'random'")
    model_overrides: dict = field(default_factory=dict, cli=False, help="ModelConfig overrides for init 'random'")
    transfer_layers: Optional[int] = field(None, min=0, help="keep the embeddings and the first N blocks of "
                                           "--init; later blocks (and a final norm) start from random init, as "
                                           "in GPT-1's Figure 2 (left)", default_text="all")
    tokenizer: Optional[str] = field(None, help="tokenizer path; required for init 'random'",
                                     default_text="the checkpoint's")
    seq_length: Optional[int] = field(None, min=1, help="tokens per input sequence (longer inputs are "
                                                        "truncated)", default_text="the model's max_seq_len")
    lr: float = field(6.25e-5, help="peak learning rate (GPT-1's)")
    batch_size: int = field(32, min=1, help="global batch, in examples (all ranks)")
    epochs: int = field(3, min=1, help="passes over the training set")
    warmup_frac: float = field(0.002, help="linear warm-up over this fraction of all steps, then linear decay to 0")
    lm_coef: float = field(0.5, min=0.0, help="lambda of the auxiliary LM loss; 0 disables it")
    clf_dropout: float = field(0.1, help="dropout before the task head")
    zero_stage: Optional[int] = field(None, choices=(0, 1, 2), help="DeepSpeed ZeRO stage (3 is refused: the "
                                      "best-checkpoint save needs full weights on rank 0)",
                                      default_text="the DeepSpeed JSON's, else 1")
    deepspeed_config: Optional[str] = field(None, flags=("--deepspeed_config", "--deepspeed-config"),
                                            help="DeepSpeed JSON; \"auto\" values are filled from this section")
    seed: int = field(1234, help="seed for init, head, dropout and shuffling")
    tensor_parallel: int = field(1, min=1, flags=("--tensor-parallel", "--tensor-model-parallel-size"),
                                 help="tensor-parallel degree (ranks / this = data-parallel replicas)")
    train_limit: Optional[int] = field(None, min=1, help="use the first N training examples", default_text="all")
    eval_limit: Optional[int] = field(None, min=1, help="use the first N eval examples", default_text="all")
    train_fraction: float = field(0.8, help="copa/storycloze: this leading fraction of the file is train, "
                                            "the rest eval")
    skip_bad: bool = field(False, help="skip (and count) malformed rows instead of failing")
    save: Optional[str] = field(None, help="writes best/ (best eval by the task's main metric) and history.json")
    force: bool = field(False, help="replace the best/ and history.json an earlier run left in --save")
    log_interval: int = field(50, min=0, flags=("--log-interval", "--log-every"),
                              help="print the training loss every N steps, 0 = never")

    def _check(self) -> None:
        super()._check()
        if self.task is None:
            raise MegaGPTError("missing: the task to finetune on", key="task")
        from megagpt.finetune.tasks import TASKS
        if self.task not in TASKS:
            raise MegaGPTError(f"task={self.task!r} must be one of {', '.join(sorted(TASKS))}", key="task")
        for name, ok, interval in (("warmup_frac", 0 <= self.warmup_frac < 1, "[0, 1)"),
                                   ("train_fraction", 0 < self.train_fraction < 1, "(0, 1)"),
                                   ("clf_dropout", 0 <= self.clf_dropout < 1, "[0, 1)")):
            if not ok:
                raise MegaGPTError(f"{name}={getattr(self, name)!r} must be in {interval}", key=name)
        if self.init == "random":
            if not self.tokenizer:
                raise MegaGPTError("missing: init 'random' needs a tokenizer (a sentencepiece .model or GPT-2 BPE "
                                   "dir)", key="tokenizer")
            if "vocab_size" in self.model_overrides:   # build_model passes the tokenizer's, and cannot take both
                from megagpt.tokenizer import load_tokenizer
                try:
                    n = load_tokenizer(self.tokenizer).vocab_size
                except MegaGPTError as e:
                    raise MegaGPTError(e.reason, key="tokenizer") from None
                raise MegaGPTError(f"vocab_size comes from the tokenizer ({n} ids); remove it from "
                                   f"--model-override", key="model_overrides")
            from megagpt.model.presets import get_preset
            try:   # the model it will build (vocab_size comes from the tokenizer)
                get_preset(self.preset, **{str(k): v for k, v in self.model_overrides.items()})
            except MegaGPTError as e:
                raise MegaGPTError(e.reason, key="preset" if e.key == "preset" else "model_overrides") from None
        if self.init == "random" and self.transfer_layers is not None:
            raise MegaGPTError("transfer_layers needs a pretrained --init (with init 'random' nothing is "
                               "transferred)", key="transfer_layers")
        if self.init != "random" and not os.path.isdir(self.init):
            raise MegaGPTError(f"{self.init}: no such checkpoint directory (or pass 'random')", key="init")
        if self.init != "random" and self.model_overrides:   # build_model would ignore them
            raise MegaGPTError(f"--model-override applies to --init random only; the model of {self.init} is "
                               f"used as it is", key="model_overrides")
        if not os.path.isdir(self.data_root):
            raise MegaGPTError(f"{self.data_root}: no such directory", key="data_root")
        if self.save:
            self._check_save()

    def _check_save(self) -> None:
        """Checked before training: found only when the first epoch's best/ is written, it would cost that epoch."""
        _refuse_files(self, ("save",))
        earlier = [n for n in ("best/", "history.json") if os.path.lexists(os.path.join(self.save, n.rstrip("/")))]
        if earlier and not self.force:
            raise MegaGPTError(f"{self.save}: already holds a finetuning run ({', '.join(earlier)}); pass --force "
                               f"to replace it", key="save")


# ------------------------------------------------------------------------------ where values came from
class _Origins:
    """Where each dotted key's value came from, for errors: its flag, else the file and line (flags only: the flag)."""

    def __init__(self, source: str | None, lines: dict, overrides: dict):
        self.source, self.lines = source, lines
        self.flags, self.names = getattr(overrides, "flags", {}), getattr(overrides, "names", {})
        self.given = set(overrides)

    def error(self, key: str, reason: str) -> MegaGPTError:
        sk = tuple(key.split(".", 1))
        if sk in self.flags:
            return MegaGPTError(reason, key=key, flag=self.flags[sk])
        if self.source is None:
            return MegaGPTError(reason, key=key, flag=self.names.get(sk))
        line = None if sk in self.given else self.lines.get(key) or self.lines.get(sk[0])
        return MegaGPTError(reason, key=key, file=self.source, line=line)

    def build(self, section: str, make, raw):
        """``make(raw)``; its error (key relative to the section) placed in the tree (dotted key, origin)."""
        try:
            return make(raw)
        except MegaGPTError as e:
            if e.file or e.flag:
                raise
            raise self.error(f"{section}.{e.key}" if e.key else section, e.reason) from None


def _sections(raw, names: tuple, origins: _Origins, overrides: dict) -> dict:
    """The file's sections as dicts (unknown or malformed ones refused), flags applied on top."""
    if not isinstance(raw, dict):
        raise MegaGPTError(f"top level must be a mapping with {', '.join(names)} sections", file=origins.source)
    for k in raw:
        if k not in names:
            raise origins.error(str(k), f"unknown section; known: {', '.join(names)}")
    out = {}
    for k in names:
        sec = raw.get(k) or {}
        if not isinstance(sec, dict):
            raise origins.error(k, f"must be a mapping of keys, got {sec!r}")
        out[k] = dict(sec)
    for (sec, key), val in overrides.items():
        out[sec][key] = val
    return out


def resolve_model(section: dict) -> ModelConfig:
    """``model:`` (preset + overrides) → ModelConfig."""
    from megagpt.model.presets import get_preset

    m = {str(k): v for k, v in section.items()}
    preset = m.pop("preset", None)
    return get_preset(preset, **m) if preset is not None else ModelConfig.from_dict(m)


# ------------------------------------------------------------------------------ the pretraining tree
@dataclass
class MegaGPTConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig
    debug: DebugConfig
    source: str = "<dict>"
    origins: Optional[_Origins] = dataclasses.field(default=None, repr=False, compare=False)  # for later errors

    SECTIONS = ("model", "data", "train", "parallel", "debug")

    def to_dict(self) -> dict:
        """The resolved config (stored in checkpoints): every YAML key of every section."""
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}

    def error(self, key: str, reason: str) -> MegaGPTError:
        """A ``MegaGPTError`` about ``key`` found after loading, placed where its value came from."""
        return (self.origins or _Origins(self.source, {}, {})).error(key, reason)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>", lines: dict | None = None,
                  overrides: dict | None = None) -> "MegaGPTConfig":
        """Build from a nested dict; ``overrides``: {(section, key): value} of flags (``schema.Overrides``)."""
        overrides = overrides if overrides is not None else {}
        origins = _Origins(source, lines or {}, overrides)
        raw = _sections(raw, cls.SECTIONS, origins, overrides)
        train = origins.build("train", TrainConfig.from_dict, raw["train"])
        debug = origins.build("debug", DebugConfig.from_dict, raw["debug"])
        tok = raw["data"].get("tokenizer")
        if "vocab_size" not in raw["model"] and isinstance(tok, str) and os.path.exists(tok):   # the tokenizer's
            from megagpt.tokenizer import load_tokenizer
            try:
                raw["model"]["vocab_size"] = load_tokenizer(tok).vocab_size
            except MegaGPTError as e:
                raise origins.error("data.tokenizer", e.reason) from None
        model = origins.build("model", resolve_model, raw["model"])
        if raw["data"].get("seq_length") is None:   # defaults to the model's
            raw["data"]["seq_length"] = model.max_seq_len
        data = origins.build("data", DataConfig.from_dict, raw["data"])
        parallel = origins.build("parallel", lambda p: ParallelConfig.from_dict(p, seed=train.seed), raw["parallel"])
        cfg = cls(model=model, data=data, train=train, parallel=parallel, debug=debug, source=source, origins=origins)
        cfg._check()
        return cfg

    def _check(self) -> None:
        m, d, t = self.model, self.data, self.train
        if not d.tokenizer:
            raise self.error("data.tokenizer", "missing; give the tokenizer the shards were made with")
        from megagpt.data.indexed import check_tokenizer
        from megagpt.tokenizer import load_tokenizer

        try:   # a shard made with another tokenizer of the same size would train silently on garbage
            tok = load_tokenizer(d.tokenizer)
            for prefix in d.prefixes:
                check_tokenizer(prefix, tok)
        except MegaGPTError as e:
            raise self.error("data.tokenizer", e.reason) from None
        if m.vocab_size < tok.vocab_size:
            raise self.error("model.vocab_size", f"vocab_size={m.vocab_size} is smaller than the {tok.vocab_size} "
                                                 f"ids of the tokenizer {d.tokenizer}")
        if d.seq_length > m.max_seq_len:
            raise self.error("data.seq_length", f"seq_length={d.seq_length} exceeds model max_seq_len={m.max_seq_len}")
        if t.save_interval and not t.save:
            raise self.error("train.save_interval", "set but train.save (checkpoint dir) is not")
        self._check_parallel()

    def _check_parallel(self) -> None:
        """Layout vs model: the same checks the parallel model builders make, but before launch."""
        from megagpt.model.sharding import check_tp, pipeline_layer_prefixes

        p, m = self.parallel, self.model
        tp, pp = p.tensor_parallel, p.pipeline_parallel
        try:
            check_tp(m, tp)
        except MegaGPTError as e:
            raise self.error("parallel.tensor_parallel", e.reason) from None
        if p.sequence_parallel:
            if tp == 1:
                raise self.error("parallel.sequence_parallel", "needs tensor_parallel > 1")
            if self.data.seq_length % tp:
                raise self.error("parallel.sequence_parallel", f"data.seq_length {self.data.seq_length} is not "
                                                               f"divisible by tensor_parallel={tp}")
        packed = [k for k in ("reset_attention_mask", "reset_position_ids") if getattr(self.data, k)]
        if packed and pp > 1:   # the document ids / positions are not carried through pipeline stages
            raise self.error(f"data.{packed[0]}", f"needs pipeline_parallel=1 (got {pp}): a pipeline's stages receive "
                                                  f"no document ids or positions (data.eod_mask_loss works with "
                                                  f"pipelines)")
        if self.train.loss_chunk_tokens and pp > 1:
            raise self.error("train.loss_chunk_tokens", "applies to the GPT's own loss, not a pipeline's last stage: "
                                                        "set it to 0 with pipeline_parallel > 1")
        if m.activation_checkpointing and pp > 1:   # the pipeline recomputes by its own interval, not per block
            raise self.error("model.activation_checkpointing", "pipelines recompute by "
                                                               "parallel.activation_checkpoint_interval (e.g. 1: every "
                                                               "layer): set that instead, and this to false")
        if self.train.compile and (tp > 1 or pp > 1):   # collectives inside the blocks: not traced or tested
            raise self.error("train.compile", f"needs tensor_parallel=pipeline_parallel=1 (got {tp} and {pp}); "
                                              f"it works with any ZeRO stage and activation checkpointing")
        n_pipe = len(pipeline_layer_prefixes(m))
        if pp > n_pipe:
            raise self.error("parallel.pipeline_parallel", f"{pp} stages exceed the {n_pipe} pipeline layers of a "
                                                           f"{m.n_layer}-layer model")


# ------------------------------------------------------------------------------ files
class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``3e-3`` is a number, not the string YAML 1.1 makes it."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_with_lines(text: str, path: str):
    """Parse YAML and remember the line of every ``section`` and ``section.key`` for error messages."""

    try:
        node = yaml.compose(text)
        data = yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise MegaGPTError(f"not valid YAML: {str(e).splitlines()[0]}", file=path,
                           line=mark.line + 1 if mark else None) from None
    lines = {}

    def note(key, k):   # PyYAML keeps the last of two equal keys without a word
        if key in lines:
            raise MegaGPTError(f"given twice (first at line {lines[key]})", file=path, key=key,
                               line=k.start_mark.line + 1)
        lines[key] = k.start_mark.line + 1

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            note(k.value, k)
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    note(f"{k.value}.{k2.value}", k2)
    return data, lines


def read_config_file(path) -> tuple[dict, dict]:
    """(contents, {dotted key: line}) of a YAML (``.yaml``/``.yml``) or JSON config file."""
    path = str(path)
    if not os.path.isfile(path):
        raise MegaGPTError("config file not found", file=path)
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            return json.loads(text), {}
        except json.JSONDecodeError as e:
            raise MegaGPTError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    raw, lines = _yaml_with_lines(text, path)
    if raw is None:   # an empty file would silently train the default model
        raise MegaGPTError("config file is empty", file=path)
    return raw, lines


def load_config(path, overrides: dict | None = None) -> MegaGPTConfig:
    """The pretraining config from a YAML/JSON file; ``overrides`` {(section, key): value} from flags."""
    raw, lines = read_config_file(path)
    return MegaGPTConfig.from_dict(raw, source=str(path), lines=lines, overrides=overrides)


def load_finetune_config(path=None, overrides: dict | None = None) -> FinetuneConfig:
    """The finetuning config: the ``finetune:`` section of a YAML/JSON file (optional), flags on top."""
    overrides = overrides if overrides is not None else {}
    raw, lines = read_config_file(path) if path is not None else ({}, {})
    origins = _Origins(str(path) if path is not None else None, lines, overrides)
    raw = _sections(raw, ("finetune",), origins, overrides)
    return origins.build("finetune", FinetuneConfig.from_dict, raw["finetune"])
