"""``MegaGPTConfig``: one YAML/JSON file with ``model``, ``data``, ``train`` (and test-only
``debug``) sections — everything a pretraining run needs besides the DeepSpeed JSON.

Loading is strict: an unknown key anywhere is a ``MegaGPTError`` naming the dotted key path, the
file and (for YAML) the line, so a typo fails before any process group starts, not silently.

Schema (defaults in the dataclasses below)::

    model:  {preset: tiny, <any ModelConfig field overriding the preset>}
    data:   {data_path: [PREFIX] | [w1, P1, w2, P2], tokenizer: PATH, split: "969,30,1",
             seq_length: null (= model.max_seq_len), seed: 1234, cache_dir: null}
    train:  {micro_batch_size, gradient_accumulation_steps, global_batch_size, train_iters,
             lr, min_lr, lr_warmup_iters, lr_decay_style, lr_decay_iters, weight_decay,
             adam_beta1, adam_beta2, adam_eps, clip_grad, seed, log_interval, eval_interval,
             eval_iters, save, load, save_interval, keep_last, exit_interval, tensorboard_dir, nan_policy,
             progress_bar, deepspeed_config}
    parallel: {tensor_parallel: 1, pipeline_parallel: 1, sequence_parallel: false,
               partition_method: parameters, activation_checkpoint_interval: 0}   # megagpt.parallel.ParallelConfig
    debug:  {inject_nan_at_step, sigkill_in_save_at_step, dump_weights}   # test hooks only, never in real runs

The parallel layout is checked against the model here (tp divides heads/ffn/vocab, enough layers for
the stages); against the world size and the DeepSpeed JSON in ``pretrain.main`` before launch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Optional

from megagpt.errors import MegaGPTError

_DECAY_STYLES = ("cosine", "linear", "constant")
_NAN_POLICIES = ("skip", "stop")


@dataclass
class DataSection:
    data_path: list = field(default_factory=list)
    tokenizer: Optional[str] = None
    split: str = "969,30,1"
    seq_length: Optional[int] = None
    seed: int = 1234
    cache_dir: Optional[str] = None


@dataclass
class TrainSection:
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    global_batch_size: Optional[int] = None   # if set, must equal micro * accum * dp_world
    train_iters: int = 1000
    lr: float = 2.5e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None      # None = train_iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100                  # 0 = no periodic validation
    eval_iters: int = 10
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0                    # 0 = only at the end / on SIGTERM / on NaN stop
    keep_last: int = 0                        # 0 = keep every checkpoint
    exit_interval: int = 0                    # save and exit 0 when step % exit_interval == 0
                                              # (stop early without changing train_iters, which
                                              # sizes the sample stream and the LR schedule)
    tensorboard_dir: Optional[str] = None     # None = <save>/tensorboard if save is set
    nan_policy: str = "skip"
    progress_bar: bool = True
    deepspeed_config: Optional[str] = None


@dataclass
class DebugSection:
    """Test-only hooks (tests/test_train_*.py); they deliberately break a run."""
    inject_nan_at_step: Optional[int] = None       # loss of this step becomes NaN on every rank
    sigkill_in_save_at_step: Optional[int] = None  # rank 0 SIGKILLs itself after writing this
                                                   # step's files but before marking it complete
    dump_weights: bool = False                     # rank 0 writes the gathered fp32 weights into
                                                   # each saved tag as weights_at_save.pt


_SECTIONS = {"data": DataSection, "train": TrainSection, "debug": DebugSection}


@dataclass
class MegaGPTConfig:
    model: dict                 # resolved ModelConfig fields (preset applied) — see .model_config()
    data: DataSection
    train: TrainSection
    debug: DebugSection
    source: str = "<dict>"
    parallel: dict = field(default_factory=dict)   # every ParallelConfig field but seed (train.seed)

    def parallel_config(self):
        from megagpt.parallel.topology import ParallelConfig
        return ParallelConfig.from_dict(dict(self.parallel), f"{self.source}: parallel", seed=self.train.seed)

    def model_config(self):
        from megagpt.model import ModelConfig
        return ModelConfig.from_dict(dict(self.model))

    def data_config(self):
        from megagpt.data import DataConfig
        d = self.data
        try:
            return DataConfig(data_path=list(d.data_path), split=d.split, seq_length=d.seq_length,
                              seed=d.seed, cache_dir=d.cache_dir)
        except MegaGPTError as e:
            raise MegaGPTError(f"{self.source}: {e}") from None

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "parallel": dict(self.parallel),
                "debug": dataclasses.asdict(self.debug)}

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>", lines: dict | None = None,
                  overrides: dict | None = None) -> "MegaGPTConfig":
        """Build from a nested dict; ``overrides`` {(section, key): value} are CLI flags."""
        lines = lines or {}

        def where(path):
            line = lines.get(path)
            return f"{source}" + (f", line {line}" if line else "") + f", key '{path}'"

        if not isinstance(raw, dict):
            raise MegaGPTError(f"{source}: top level must be a mapping with model/data/train sections")
        names = ("model", "data", "train", "parallel", "debug")
        for k in raw:
            if k not in names:
                raise MegaGPTError(f"{where(k)}: unknown section; known: {', '.join(names)}")
        raw = {k: dict(raw.get(k) or {}) for k in names}
        for (sec, key), val in (overrides or {}).items():
            raw[sec][key] = val
        sections = {}
        for name, klass in _SECTIONS.items():
            known = {f.name: f for f in fields(klass)}
            hints = typing.get_type_hints(klass)
            for k, v in raw[name].items():
                if k not in known:
                    raise MegaGPTError(f"{where(f'{name}.{k}')}: unknown key; known {name} keys: {', '.join(known)}")
                _check_type(where(f"{name}.{k}"), v, hints[k])
            sections[name] = klass(**raw[name])
        model = _resolve_model(raw["model"], sections["data"], where)
        parallel = _resolve_parallel(raw["parallel"], where)
        cfg = cls(model=model, source=source, parallel=parallel, **sections)
        cfg._validate(where)
        return cfg

    def _validate(self, where):
        t, d = self.train, self.data
        for k in ("micro_batch_size", "gradient_accumulation_steps", "train_iters", "log_interval"):
            if getattr(t, k) < 1:
                raise MegaGPTError(f"{where('train.' + k)}: {getattr(t, k)} must be >= 1")
        for k in ("lr_warmup_iters", "eval_interval", "eval_iters", "save_interval", "keep_last", "exit_interval"):
            if getattr(t, k) < 0:
                raise MegaGPTError(f"{where('train.' + k)}: {getattr(t, k)} must be >= 0")
        if t.lr_decay_style not in _DECAY_STYLES:
            raise MegaGPTError(f"{where('train.lr_decay_style')}: {t.lr_decay_style!r} must be one of {_DECAY_STYLES}")
        if t.nan_policy not in _NAN_POLICIES:
            raise MegaGPTError(f"{where('train.nan_policy')}: {t.nan_policy!r} must be one of {_NAN_POLICIES}")
        if not (0 <= t.min_lr <= t.lr):
            raise MegaGPTError(f"{where('train.min_lr')}: {t.min_lr} must be in [0, lr={t.lr}]")
        if not d.data_path:
            raise MegaGPTError(f"{where('data.data_path')}: missing; give the shard prefix(es) to train on")
        if not d.tokenizer:
            raise MegaGPTError(f"{where('data.tokenizer')}: missing; give the tokenizer the shards were made with")
        if not os.path.exists(d.tokenizer):
            raise MegaGPTError(f"{where('data.tokenizer')}: {d.tokenizer} does not exist")
        if d.seq_length > self.model["max_seq_len"]:
            raise MegaGPTError(f"{where('data.seq_length')}: {d.seq_length} exceeds model max_seq_len="
                               f"{self.model['max_seq_len']}")
        if t.save_interval and not t.save:
            raise MegaGPTError(f"{where('train.save_interval')}: set but train.save (checkpoint dir) is not")
        self._validate_parallel(where)
        try:
            self.data_config()  # existence of every shard, split syntax
        except MegaGPTError as e:
            raise MegaGPTError(f"{where('data')}: {str(e).split(': ', 1)[-1]}") from None

    def _validate_parallel(self, where):
        """Layout vs model: the same checks the parallel model builders make, but before launch."""
        from megagpt.model.sharding import check_tp

        p, m = self.parallel, self.model_config()
        tp, pp = p["tensor_parallel"], p["pipeline_parallel"]
        try:
            check_tp(m, tp)
        except MegaGPTError as e:
            raise MegaGPTError(f"{where('parallel.tensor_parallel')}: {e}") from None
        if p["sequence_parallel"]:
            if tp == 1:
                raise MegaGPTError(f"{where('parallel.sequence_parallel')}: needs tensor_parallel > 1")
            if self.data.seq_length % tp:
                raise MegaGPTError(f"{where('parallel.sequence_parallel')}: data.seq_length {self.data.seq_length} "
                                   f"is not divisible by tensor_parallel={tp}")
        n_pipe = m.n_layer + 3 + (1 if m.norm_position == "pre" else 0)  # embed, pos, blocks, ln_f, head
        if pp > n_pipe:
            raise MegaGPTError(f"{where('parallel.pipeline_parallel')}: {pp} stages exceed the {n_pipe} pipeline "
                               f"layers of a {m.n_layer}-layer model")


def _resolve_parallel(p: dict, where) -> dict:
    """The parallel section checked by ParallelConfig itself; returns every field but seed, filled."""
    from megagpt.parallel.topology import ParallelConfig

    if "seed" in p:
        raise MegaGPTError(f"{where('parallel.seed')}: unknown key; the seed comes from train.seed")
    known = [f.name for f in fields(ParallelConfig) if f.name != "seed"]
    for k in p:
        if k not in known:
            raise MegaGPTError(f"{where(f'parallel.{k}')}: unknown key; known parallel keys: {', '.join(known)}")
    try:
        pc = ParallelConfig.from_dict(p, "parallel")
    except MegaGPTError as e:
        key = next((k for k in p if f"{k}=" in str(e)), None)
        raise MegaGPTError(f"{where(f'parallel.{key}') if key else where('parallel')}: "
                           f"{str(e).split(': ', 2)[-1]}") from None
    return {k: getattr(pc, k) for k in known}


def _resolve_model(m: dict, data: DataSection, where) -> dict:
    """Preset + overrides → full ModelConfig dict; vocab_size from the tokenizer when not given."""
    from megagpt.model import ModelConfig, get_preset

    m = dict(m)
    preset = m.pop("preset", None)
    if data.tokenizer and "vocab_size" not in m and os.path.exists(data.tokenizer):
        from megagpt.tokenizer import load_tokenizer
        m["vocab_size"] = load_tokenizer(data.tokenizer).vocab_size
    try:
        cfg = get_preset(preset, **m) if preset else ModelConfig.from_dict(m)
    except MegaGPTError as e:
        raise MegaGPTError(f"{where('model')}: {e}") from None
    except TypeError as e:
        raise MegaGPTError(f"{where('model')}: {e}") from None
    if data.seq_length is None:
        data.seq_length = cfg.max_seq_len
    return cfg.to_dict()


def _check_type(where, value, hint):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, (list, str))}[hint](value)
    if not ok:
        raise MegaGPTError(f"{where}: {value!r} must be of type {hint.__name__}")


def _yaml_with_lines(text: str, path: str):
    """Parse YAML and remember the line of every ``section.key`` for error messages."""
    import yaml

    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MegaGPTError(f"{path}: not valid YAML: {str(e).splitlines()[0]} {getattr(e, 'problem_mark', '')}") from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[k.value] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return data, lines


def load_config(path, overrides: dict | None = None) -> MegaGPTConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON megagpt config; ``overrides`` from CLI flags."""
    path = str(path)
    if not os.path.isfile(path):
        raise MegaGPTError(f"{path}: config file not found")
    text = open(path).read()
    if path.endswith(".json"):
        try:
            raw, lines = json.loads(text), {}
        except json.JSONDecodeError as e:
            raise MegaGPTError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
    else:
        raw, lines = _yaml_with_lines(text, path)
    return MegaGPTConfig.from_dict(raw or {}, source=path, lines=lines, overrides=overrides)
