"""ModelConfig: every architectural choice of a megagpt GPT, validated on construction
(``megagpt.schema``; a mistake is a ``MegaGPTError`` whose ``key`` is the field name).

The field names are stored in every checkpoint: never rename one. Defaults that depend on other
fields stay ``None`` and are resolved by properties, so ``dataclasses.replace(cfg, n_embd=...)``
never keeps a stale derived value.
"""
import math
from dataclasses import dataclass
from typing import Optional

from megagpt.errors import MegaGPTError
from megagpt.schema import Section, field


@dataclass
class ModelConfig(Section):
    vocab_size: int = field(50257, min=1, help="token ids (default: the tokenizer's size in a run config)")
    n_layer: int = field(12, min=1, help="transformer blocks")
    n_embd: int = field(768, min=1, help="hidden width")
    n_head: int = field(12, min=1, help="attention heads")
    n_kv_head: Optional[int] = field(None, min=1, help="key/value heads: null = n_head (MHA), fewer = GQA, 1 = MQA")
    ffn_hidden: Optional[int] = field(None, min=1, help="MLP width: null = 4*n_embd, or for swiglu 8/3*n_embd "
                                                        "rounded up to 64")
    max_seq_len: int = field(1024, min=1, help="context length (positions)")
    norm: str = field("layernorm", choices=("layernorm", "rmsnorm"), help="normalisation")
    norm_position: str = field("pre", choices=("post", "pre"), help="post = GPT-1, pre = GPT-2")
    norm_eps: float = field(1e-5, help="epsilon of the norms")
    pos_emb: str = field("learned", choices=("learned", "rope"), help="position encoding")
    rope_theta: float = field(10000.0, help="RoPE base")
    activation: str = field("gelu_tanh", choices=("gelu", "gelu_tanh", "swiglu"),
                            help="gelu (exact), gelu_tanh (GPT-2 gelu_new) or swiglu")
    bias: bool = field(True, help="biases in every linear and norm")
    tie_embeddings: bool = field(True, help="the output head shares the token embedding")
    embd_dropout: float = field(0.0, help="dropout after the embeddings")
    resid_dropout: float = field(0.0, help="dropout on each residual branch")
    attn_dropout: float = field(0.0, help="dropout on the attention probabilities")
    init_std: float = field(0.02, help="std of the normal weight init")
    scaled_residual_init: bool = field(False, help="GPT-2: output projections get init_std / sqrt(2*n_layer)")
    pad_vocab_multiple: int = field(128, min=1, help="embedding rows padded to a multiple of this (fast "
                                                     "matmuls, TP splits)")
    activation_checkpointing: bool = field(False, help="recompute each block in backward")
    name: str = field("custom", help="preset name, for logs only")

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

    # ---- validation (types, choices and lower bounds: megagpt.schema) ----------------------
    def _check(self) -> None:
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


def _bad(name, value, why):
    raise MegaGPTError(f"{name}={value!r} {why}", key=name)
