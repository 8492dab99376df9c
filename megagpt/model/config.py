"""ModelConfig: every architectural choice of a megagpt GPT, validated on construction.

Defaults that depend on other fields stay ``None`` in the stored config and are resolved by
properties (``num_kv_heads``, ``ffn_dim``, ``head_dim``, ``padded_vocab_size``), so
``dataclasses.replace(cfg, n_embd=...)`` never keeps a stale derived value.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Optional

from megagpt.errors import MegaGPTError

_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("post", "pre"),
    "pos_emb": ("learned", "rope"),
    "activation": ("gelu", "gelu_tanh", "swiglu"),
}


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: Optional[int] = None       # None = n_head (MHA); fewer = GQA; 1 = MQA
    ffn_hidden: Optional[int] = None      # None = 4*n_embd, or for swiglu 8/3*n_embd rounded up to 64
    max_seq_len: int = 1024
    norm: str = "layernorm"               # "layernorm" | "rmsnorm"
    norm_position: str = "pre"            # "post" = GPT-1, "pre" = GPT-2
    norm_eps: float = 1e-5
    pos_emb: str = "learned"              # "learned" | "rope"
    rope_theta: float = 10000.0
    activation: str = "gelu_tanh"         # "gelu" (exact) | "gelu_tanh" (GPT-2 gelu_new) | "swiglu"
    bias: bool = True                     # biases in every linear and norm
    tie_embeddings: bool = True
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    scaled_residual_init: bool = False    # GPT-2: output projections get init_std / sqrt(2*n_layer)
    pad_vocab_multiple: int = 128         # embedding rows padded for fast matmuls (and TP splits)
    activation_checkpointing: bool = False
    name: str = "custom"                  # preset name, for logs only

    def __post_init__(self):
        self.validate()

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.activation == "swiglu":  # same parameter count as a 4x GELU MLP, rounded up to 64
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "max_seq_len", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be >= 1")
        for name in ("n_kv_head", "ffn_hidden"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be >= 1 (or null for the default)")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                _bad(name, getattr(self, name), f"must be one of {', '.join(choices)}")
        if self.n_embd % self.n_head:
            _bad("n_embd", self.n_embd, f"must be divisible by n_head={self.n_head}")
        if self.n_head % self.num_kv_heads:
            _bad("n_kv_head", self.n_kv_head, f"must divide n_head={self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            _bad("n_embd", self.n_embd, f"rope needs an even head_dim, got {self.head_dim}")
        for name in ("norm_eps", "init_std", "rope_theta"):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "must be > 0")
        for name in ("embd_dropout", "resid_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(name, getattr(self, name), "must be in [0, 1)")

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise MegaGPTError(
                f"model config: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}"
            )
        return cls(**d)


def _bad(name, value, why):
    raise MegaGPTError(f"model config: {name}={value!r} {why}")


def _check_type(name, value, hint):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        _bad(name, value, f"must be of type {hint.__name__}")
