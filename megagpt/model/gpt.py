"""The GPT decoder: GPT-1 (post-LN), GPT-2 (pre-LN) and Llama-style blocks from one ModelConfig,
serial at tp=1 and tensor-parallel at tp>1 (the same class; the megagpt/tp layers skip every
collective when the group has one rank). Pipeline stages (pipeline.py) are built from these modules.

Parameter names (stable: checkpoints, the HF exporter and tensor parallelism map these; full
serial shapes, each TP rank holding the slice sharding.py describes):

    embed.tok.weight              (padded_vocab, n_embd)   token embedding
    embed.pos.weight              (max_seq_len, n_embd)    learned positions only (absent for rope)
    blocks.{i}.ln1.weight/.bias   norm around attention    (bias only for layernorm with bias=True)
    blocks.{i}.attn.qkv.weight    ((n_head + 2*n_kv_head)*head_dim, n_embd), rows [q; k; v], .bias if bias
    blocks.{i}.attn.proj.weight   (n_embd, n_embd), .bias if bias
    blocks.{i}.ln2.weight/.bias   norm around the MLP
    blocks.{i}.mlp.fc.weight      (ffn_dim, n_embd), .bias   (SwiGLU: the "up" projection)
    blocks.{i}.mlp.gate.weight    (ffn_dim, n_embd)          SwiGLU only
    blocks.{i}.mlp.proj.weight    (n_embd, ffn_dim), .bias
    ln_f.weight/.bias             final norm, pre-LN only (GPT-1 post-LN has none)
    lm_head.weight                (padded_vocab, n_embd); with tie_embeddings the same Parameter as
                                  embed.tok.weight (state_dict lists both keys, parameters() one)

Vocabulary rows beyond ``vocab_size`` exist only for matmul speed and even TP splits: logits and
loss use the first ``vocab_size`` columns only, so padded ids are never predicted and logits match
an HF model of ``vocab_size`` (at tp>1 the vocab-parallel loss masks them instead of gathering).
"""
import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megagpt.data.gpt_dataset import PackedInputs
from megagpt.errors import MegaGPTError
from megagpt.tp import SERIAL
from megagpt.tp.cross_entropy import vocab_parallel_cross_entropy
from megagpt.tp.layers import ColumnParallelLinear, column_parallel_linear, gather_from_tp
from megagpt.tp.random import checkpoint as tp_checkpoint
from megagpt_kernels import dispatch

from .attention import CausalSelfAttention, KVCache
from .config import ModelConfig
from .embedding import Embedding, rope_cos_sin
from .mlp import MLP
from .norm import Norm
from .sharding import check_tp, merge, shard, shard_kind, with_tied_names

log = logging.getLogger("megagpt.model")


def lm_loss(logits_local, labels, cfg, tp=SERIAL):
    """Mean token cross-entropy over labels != -100 of this rank's vocab slice of the logits."""
    if tp.size == 1:   # fused (Triton) on CUDA; the reference is F.cross_entropy in fp32
        return dispatch.cross_entropy(logits_local[..., : cfg.vocab_size], labels, -100)
    vocab_start = tp.rank * (cfg.padded_vocab_size // tp.size)
    return vocab_parallel_cross_entropy(logits_local, labels, tp.group, vocab_start, cfg.vocab_size)


def chunked_lm_loss(hidden, head_weight, labels, cfg, tp, chunk_tokens: int):
    """``lm_loss`` of replicated ``hidden`` (B, T, C), ``chunk_tokens`` tokens at a time: each chunk's
    logits are recomputed in backward (activation checkpointing), so the full-vocabulary fp32 logits
    of the batch never exist at once. Equal to the one-shot loss up to the order of the final sum."""
    h, y = hidden.flatten(0, 1), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(
            _chunk_loss_sum, h[start:start + chunk_tokens], head_weight, y[start:start + chunk_tokens], cfg, tp,
            use_reentrant=False)
    return total / (y != -100).sum().clamp(min=1)


def _chunk_loss_sum(h, weight, y, cfg, tp):
    logits_local = column_parallel_linear(h, weight, None, tp.group)
    return lm_loss(logits_local[None], y[None], cfg, tp) * (y != -100).sum()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp=SERIAL):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln1 = Norm(cfg, tp)
        self.attn = CausalSelfAttention(cfg, layer_idx, tp)
        self.ln2 = Norm(cfg, tp)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, rope=None, kv_cache=None, doc_ids=None):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope, kv_cache, doc_ids)
            x = x + self.mlp(self.ln2(x))
        else:
            x = self.ln1(x + self.attn(x, rope, kv_cache, doc_ids))
            x = self.ln2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    """The model. ``tp`` (a megagpt.tp.TPContext) selects this rank's tensor-parallel slice;
    ``init=False`` leaves the weights uninitialised (they are about to be loaded)."""

    def __init__(self, cfg: ModelConfig, tp=SERIAL, init: bool = True):
        super().__init__()
        cfg.validate()
        check_tp(cfg, tp.size)
        self.cfg, self.tp = cfg, tp
        self.loss_chunk_tokens = 0   # > 0: the training loss by ``chunked_lm_loss`` (train.loss_chunk_tokens)
        self.embed = Embedding(cfg, tp)
        self.blocks = nn.ModuleList(Block(cfg, i, tp) for i in range(cfg.n_layer))
        self.ln_f = Norm(cfg, tp) if cfg.norm_position == "pre" else None
        self.lm_head = ColumnParallelLinear(cfg.n_embd, cfg.padded_vocab_size, False, tp)
        self.tie_weights()
        if init:
            self.init_weights()
            log.info("GPT %s: %s params (%s non-embedding), %d layers, width %d, tp=%d, kernels=%s",
                     cfg.name, f"{self.num_params():,}", f"{self.num_params(non_embedding=True):,}",
                     cfg.n_layer, cfg.n_embd, tp.size, dispatch.backend_name())

    def init_weights(self) -> None:
        """The layout-independent initial weights (``init_stream``), this rank's slices."""
        init_params(dict(self.named_parameters(remove_duplicate=False)), self.cfg, self.tp)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def _apply(self, fn, *args, **kwargs):
        # Conversions that create new Parameters (to_empty from meta, swapped params) would untie.
        super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        return self

    def forward_hidden(self, input_ids, kv_cache: KVCache = None, position_ids=None, doc_ids=None):
        """Final hidden states (B, T, n_embd), replicated on every TP rank (for a finetuning head,
        which computes the same on every rank: so the sequence gather's backward keeps the own chunk)."""
        h = self._hidden_local(input_ids, kv_cache, position_ids, doc_ids)
        return gather_from_tp(h, self.tp.group, dim=1) if self.tp.sequence_parallel else h

    def _hidden_local(self, input_ids, kv_cache=None, position_ids=None, doc_ids=None):
        """Final hidden states of this rank's sequence chunk (all of it without sequence parallelism).
        ``position_ids``/``doc_ids`` (B, T), whole sequence on every TP rank: a packed batch's reset
        positions and document ids (data.reset_position_ids / reset_attention_mask)."""
        cfg, tp = self.cfg, self.tp
        start = kv_cache.length if kv_cache is not None else 0
        T = input_ids.shape[1]
        for name, ids in (("position_ids", position_ids), ("doc_ids", doc_ids)):
            if ids is not None and kv_cache is not None:
                raise MegaGPTError(f"{name} (packed-sample training) cannot be used with a KV cache")
            if ids is not None and tuple(ids.shape) != tuple(input_ids.shape):
                raise MegaGPTError(f"{name} of shape {tuple(ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        if start + T > cfg.max_seq_len:
            raise MegaGPTError(
                f"sequence of {start + T} tokens (cached {start} + new {T}) exceeds max_seq_len={cfg.max_seq_len}")
        if tp.sequence_parallel and (kv_cache is not None or T % tp.size):
            raise MegaGPTError(f"sequence_parallel: {T} new tokens{' with a KV cache' if kv_cache else ''} cannot "
                               f"be split over tensor_parallel={tp.size}; build the model without sequence "
                               f"parallelism for generation")
        x = self.embed(input_ids, start, position_ids)
        rope = rope_cos_sin(cfg, start, T, input_ids.device, position_ids)
        checkpointing = cfg.activation_checkpointing and self.training and kv_cache is None
        for block in self.blocks:
            if checkpointing:
                x = tp_checkpoint(tp.rng, block, x, rope, None, doc_ids)
            else:
                x = block(x, rope, kv_cache, doc_ids)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.ln_f(x) if self.ln_f is not None else x

    def forward(self, input_ids, labels=None, kv_cache: KVCache = None, position_ids=None, doc_ids=None):
        """Logits (B, T, vocab_size), or the mean cross-entropy over labels != -100 if given
        (labels come aligned: labels[t] is the token after input_ids[t]). ``input_ids`` may be a packed
        batch's ``PackedInputs`` (input_ids, position_ids, doc_ids), as the training loop passes it."""
        if isinstance(input_ids, PackedInputs):
            input_ids, position_ids, doc_ids = input_ids
        if labels is not None and labels.shape != input_ids.shape:
            raise MegaGPTError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if labels is not None and self.loss_chunk_tokens:
            return chunked_lm_loss(self.forward_hidden(input_ids, kv_cache, position_ids, doc_ids),
                                   self.lm_head.weight, labels, self.cfg, self.tp, self.loss_chunk_tokens)
        hidden = self._hidden_local(input_ids, kv_cache, position_ids, doc_ids)
        logits_local = self.lm_head(hidden)   # gathers a split sequence
        if labels is None:
            return gather_from_tp(logits_local, self.tp.group, dim=-1)[..., : self.cfg.vocab_size]
        return lm_loss(logits_local, labels, self.cfg, self.tp)

    def lm_loss_from_hidden(self, hidden, labels):
        """LM loss from ``forward_hidden``'s replicated output (a finetuning head's auxiliary L1),
        without recomputing the body: this rank's vocab slice of the logits, then ``lm_loss``."""
        logits_local = column_parallel_linear(hidden, self.lm_head.weight, None, self.tp.group)
        return lm_loss(logits_local, labels, self.cfg, self.tp)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def load_full_state_dict(self, full_sd: dict) -> None:
        """Copy this rank's slices of a full (serial-named) state dict into the model."""
        load_slices(dict(self.named_parameters(remove_duplicate=False)), full_sd, self.cfg, self.tp)

    def full_state_dict(self) -> dict:
        """Full serial-named tensors (gathered across TP: a collective at tp>1; every rank gets them)."""
        return gather_slices(self.state_dict(), self.cfg, self.tp)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters of the whole model (tied weights once; full sizes at any TP).
        non_embedding drops token/position tables and lm_head (Kaplan et al.'s N)."""
        tables = [self.embed.tok, self.embed.pos, self.lm_head] if non_embedding else []
        skip = {id(m.weight) for m in tables if m is not None}
        return sum(p.numel() * (1 if shard_kind(n) == "replicated" else self.tp.size)
                   for n, p in self.named_parameters() if id(p) not in skip)

    def flops_per_token(self, seq_length: int) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12*L*H*Q*T, N = the weights in a matmul
        per token (non-embedding parameters + lm_head; embedding lookups cost no FLOPs)."""
        cfg = self.cfg
        n = self.num_params(non_embedding=True) + cfg.padded_vocab_size * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_length


def init_stream(cfg):
    """The initial-weight random stream, as (draw, serial name, std) in order: a layout-free
    definition every rank replays, keeping only its own slices.

    It is the stream the serial model has drawn since the first release (so tp=pp=1 runs stay
    bit-identical): first torch's default construction of each Embedding (normal_) and Linear
    (uniform_ weight and bias) in registration order, values discarded; then N(0, std) for every
    matrix in the same order, output projections at proj_std. A tied head is drawn last into the
    shared token table (its value wins, as it always did).
    """
    std = cfg.init_std
    proj_std = std / math.sqrt(2 * cfg.n_layer) if cfg.scaled_residual_init else std
    mlp = ["mlp.fc", "mlp.gate", "mlp.proj"] if cfg.activation == "swiglu" else ["mlp.fc", "mlp.proj"]
    linears = [f"blocks.{i}.{n}" for i in range(cfg.n_layer) for n in ["attn.qkv", "attn.proj", *mlp]]
    tables = ["embed.tok"] + (["embed.pos"] if cfg.pos_emb == "learned" else [])
    head = "embed.tok" if cfg.tie_embeddings else "lm_head"
    stream = [("construct_normal", t + ".weight", None) for t in tables]
    stream += [("construct_uniform", n + part, None) for n in linears
               for part in ([".weight", ".bias"] if cfg.bias else [".weight"])]
    stream.append(("construct_uniform", "lm_head.weight", None))
    stream += [("normal", t + ".weight", std) for t in tables]
    stream += [("normal", n + ".weight", proj_std if n.endswith(".proj") else std) for n in linears]
    stream.append(("normal", head + ".weight", std))
    return stream


def full_shapes(cfg) -> dict:
    """Serial name -> full shape of every parameter (both tied names included)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg, init=False).state_dict().items()}


@torch.no_grad()
def init_params(params: dict, cfg, tp=SERIAL) -> None:
    """Initialise ``params`` ({serial name: this rank's parameter}; any subset of the model, e.g.
    one pipeline stage's) by replaying ``init_stream`` on the default CPU generator. Biases and
    norms keep the zeros and ones they are created with."""
    if any(p.is_meta for p in params.values()):
        return
    shapes = full_shapes(cfg)
    for draw, name, std in init_stream(cfg):
        full = torch.empty(shapes[name])
        if draw == "construct_uniform":
            full.uniform_()
            continue
        full.normal_(0.0, 1.0 if std is None else std)
        if draw == "normal" and name in params:
            p = params[name]
            p.copy_(shard(name, full, tp.rank, tp.size, cfg).to(p.device, p.dtype))


@torch.no_grad()
def load_slices(params: dict, full_sd: dict, cfg, tp=SERIAL) -> None:
    """Copy this rank's slices of ``full_sd`` (serial names) into ``params`` ({serial name: param})."""
    full_sd = with_tied_names(full_sd, cfg)
    missing = sorted(n for n in params if n not in full_sd)
    if missing:
        raise MegaGPTError(f"state dict has no {missing[:4]} (keys like {sorted(full_sd)[:4]}...)")
    for name, p in params.items():
        local = shard(name, full_sd[name], tp.rank, tp.size, cfg)
        if local.shape != p.shape:
            raise MegaGPTError(f"{name}: shape {tuple(full_sd[name].shape)} does not fit this model "
                               f"(slice {tuple(local.shape)} vs {tuple(p.shape)})")
        p.copy_(local)


@torch.no_grad()
def gather_slices(local_sd: dict, cfg, tp=SERIAL) -> dict:
    """Full serial-named tensors from this rank's ``local_sd`` (a collective over the TP group)."""
    out = {}
    for name, t in local_sd.items():
        t = t.detach().contiguous()
        parts = [t]
        if tp.size > 1 and shard_kind(name) != "replicated":
            parts = [torch.empty_like(t) for _ in range(tp.size)]
            dist.all_gather(parts, t, group=tp.group)
        out[name] = merge(name, parts, cfg).clone()
    return out
