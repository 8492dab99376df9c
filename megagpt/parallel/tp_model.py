"""The tensor-parallel GPT: the serial model's block structure with Megatron-style split layers.

Parameter names are the serial GPT's (gpt.py docstring); each rank holds its slice as described
in reshape.py. ``load_from_full_state_dict(full_sd)`` slices a serial state dict into this rank's
parameters; ``full_state_dict()`` gathers them back (every TP rank gets the full dict), which is
how equivalence tests and checkpoint reshaping move weights between layouts.

Sequence parallelism (``ParallelConfig.sequence_parallel``): the residual stream between blocks
is (B, T/tp, C); norms and residual dropout run on the local chunk; the column-parallel input is
all-gathered and the row-parallel output reduce-scattered. Parameters used on a sequence chunk
(norm weights, row-parallel biases, position table) get their gradients summed across TP by
passing through ``copy_to_tp`` (identity forward, all-reduce backward).
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megagpt.errors import MegaGPTError
from megagpt.model.embedding import apply_rope, rope_cos_sin
from megagpt_kernels import dispatch

from . import reshape
from .cross_entropy import vocab_parallel_cross_entropy
from .random import checkpoint as tp_checkpoint
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                              gather_from_seq, gather_from_tp)


class TPNorm(nn.Module):
    def __init__(self, cfg, state):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.group, self.sp = state.tp_group, state.sequence_parallel
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        has_bias = cfg.norm == "layernorm" and cfg.bias
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if has_bias else None

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.sp:
            w = copy_to_tp(w, self.group)
            b = copy_to_tp(b, self.group) if b is not None else None
        if self.kind == "rmsnorm":
            return dispatch.rms_norm(x, w, self.eps)
        return dispatch.layer_norm(x, w, b, self.eps)


class _Dropout(nn.Module):
    """Residual/embedding dropout: same mask on all TP ranks unless the activation is sequence-split."""

    def __init__(self, p, state):
        super().__init__()
        self.p, self.state = p, state

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.state.sequence_parallel:
            with self.state.rng.fork():
                return F.dropout(x, self.p, True)
        return F.dropout(x, self.p, True)


class TPAttention(nn.Module):
    def __init__(self, cfg, state):
        super().__init__()
        tp, g, sp = state.tp_size, state.tp_group, state.sequence_parallel
        self.hq, self.hkv, self.d = cfg.n_head // tp, cfg.num_kv_heads // tp, cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.n_embd, (self.hq + 2 * self.hkv) * self.d, cfg.bias, g, sp)
        self.proj = RowParallelLinear(self.hq * self.d, cfg.n_embd, cfg.bias, g, sp)
        self.attn_dropout, self.state = cfg.attn_dropout, state
        self.drop = _Dropout(cfg.resid_dropout, state)

    def forward(self, x, rope=None):
        qkv = self.qkv(x)                                   # (B, T, local heads * D), full T
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(B, T, self.hq, self.d).transpose(1, 2)
        k = k.view(B, T, self.hkv, self.d).transpose(1, 2)
        v = v.view(B, T, self.hkv, self.d).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.attn_dropout if self.training else 0.0
        with self.state.rng.fork():                         # heads differ per TP rank: so do masks
            y = dispatch.attention(q, k, v, causal=True, dropout_p=p, scale=None)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, self.hq * self.d)))


class TPMLP(nn.Module):
    def __init__(self, cfg, state):
        super().__init__()
        tp, g, sp = state.tp_size, state.tp_group, state.sequence_parallel
        self.activation = cfg.activation
        self.fc = ColumnParallelLinear(cfg.n_embd, cfg.ffn_dim // tp, cfg.bias, g, sp)
        self.gate = ColumnParallelLinear(cfg.n_embd, cfg.ffn_dim // tp, cfg.bias, g, sp) \
            if cfg.activation == "swiglu" else None
        self.proj = RowParallelLinear(cfg.ffn_dim // tp, cfg.n_embd, cfg.bias, g, sp)
        self.drop = _Dropout(cfg.resid_dropout, state)

    def forward(self, x):
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        else:
            h = F.gelu(self.fc(x), approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.drop(self.proj(h))


class TPBlock(nn.Module):
    def __init__(self, cfg, state):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln1, self.attn = TPNorm(cfg, state), TPAttention(cfg, state)
        self.ln2, self.mlp = TPNorm(cfg, state), TPMLP(cfg, state)

    def forward(self, x, rope=None):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, rope))
        return self.ln2(x + self.mlp(x))


class TPEmbedding(nn.Module):
    """Vocab-parallel token table + replicated learned positions (+ dropout)."""

    def __init__(self, cfg, state):
        super().__init__()
        self.state = state
        self.tok = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.n_embd, state.tp_group, state.tp_rank,
                                          state.tp_size, state.sequence_parallel)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = _Dropout(cfg.embd_dropout, state)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.tok(input_ids)                             # (B, T, C) or (B, T/tp, C) with SP
        if self.pos is not None:
            pos_w = self.pos.weight
            positions = torch.arange(T, device=input_ids.device)
            if self.state.sequence_parallel:
                n = T // self.state.tp_size
                positions = positions[self.state.tp_rank * n:(self.state.tp_rank + 1) * n]
                pos_w = copy_to_tp(pos_w, self.state.tp_group)
            x = x + F.embedding(positions, pos_w)
        return self.drop(x)


def rope_for(cfg, seq_len, device):
    if cfg.pos_emb != "rope":
        return None
    return rope_cos_sin(torch.arange(seq_len, device=device), cfg.head_dim, cfg.rope_theta)


def lm_logits_local(hidden, weight, state):
    """This rank's vocab slice of the logits; the hidden states are replicated first (gathered
    along the sequence with SP)."""
    h = gather_from_seq(hidden, state.tp_group) if state.sequence_parallel else copy_to_tp(hidden, state.tp_group)
    return F.linear(h, weight)


def tp_loss(logits_local, labels, cfg, state):
    vocab_start = state.tp_rank * (cfg.padded_vocab_size // state.tp_size)
    return vocab_parallel_cross_entropy(logits_local, labels, state.tp_group, vocab_start, cfg.vocab_size)


class TPGPT(nn.Module):
    def __init__(self, cfg, state):
        super().__init__()
        reshape.check_tp(cfg, state.tp_size)
        self.cfg, self.state = cfg, state
        self.embed = TPEmbedding(cfg, state)
        self.blocks = nn.ModuleList(TPBlock(cfg, state) for _ in range(cfg.n_layer))
        self.ln_f = TPNorm(cfg, state) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Module()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        else:
            self.lm_head.weight = nn.Parameter(torch.empty_like(self.embed.tok.weight))
            self.lm_head.weight.tensor_model_parallel = True
        init_tp_weights(self, cfg, state)
        sync_replicated(self, state)

    def forward(self, input_ids, labels=None):
        cfg, state = self.cfg, self.state
        T = input_ids.shape[1]
        if T > cfg.max_seq_len:
            raise MegaGPTError(f"sequence of {T} tokens exceeds max_seq_len={cfg.max_seq_len}")
        if state.sequence_parallel and T % state.tp_size:
            raise MegaGPTError(f"sequence_parallel: sequence length {T} not divisible by tensor_parallel={state.tp_size}")
        rope = rope_for(cfg, T, input_ids.device)
        x = self.embed(input_ids)
        for block in self.blocks:
            if cfg.activation_checkpointing and self.training:
                x = tp_checkpoint(state.rng, block, x, rope)
            else:
                x = block(x, rope)
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = lm_logits_local(x, self.lm_head.weight, state)
        if labels is None:
            return gather_from_tp(logits, state.tp_group)[..., : cfg.vocab_size]
        if labels.shape != input_ids.shape:
            raise MegaGPTError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return tp_loss(logits, labels, cfg, state)

    def load_from_full_state_dict(self, full_sd: dict) -> None:
        load_local(self, "", full_sd, self.cfg, self.state)

    def full_state_dict(self) -> dict:
        return gather_full(self, "", self.cfg, self.state)


def init_tp_weights(module, cfg, state):
    """Serial GPT's init rules (N(0, init_std) matrices, zero biases, unit norms, optionally
    scaled output projections); split weights drawn from the per-TP-rank generator."""
    for name, p in module.named_parameters():
        full = getattr(module, "full_prefix", "") + name
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif isinstance(module, TPNorm) or full.endswith(("ln1.weight", "ln2.weight")) or full.startswith("ln_f"):
            nn.init.ones_(p)
        else:
            std = cfg.init_std
            if cfg.scaled_residual_init and full.endswith(("attn.proj.weight", "mlp.proj.weight")):
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
            if getattr(p, "tensor_model_parallel", False):
                with state.rng.fork():
                    nn.init.normal_(p, 0.0, std)
            else:
                nn.init.normal_(p, 0.0, std)


@torch.no_grad()
def sync_replicated(module, state) -> None:
    """Make replicated parameters identical across the TP group (DeepSpeed broadcasts only over DP)."""
    if state.tp_size == 1:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            dist.broadcast(p.data, src=state.ranks["tp"][0], group=state.tp_group)


@torch.no_grad()
def load_local(module, prefix, full_sd, cfg, state):
    """Copy this rank's slices of ``full_sd`` (serial names) into ``module`` (whose names, after
    ``prefix``, are serial names)."""
    for name, t in module.state_dict(keep_vars=True).items():
        full_name = prefix + name
        if full_name not in full_sd:
            raise MegaGPTError(f"full state dict has no {full_name!r} (keys like {sorted(full_sd)[:4]}...)")
        local = reshape.shard(full_name, full_sd[full_name], state.tp_rank, state.tp_size, cfg)
        if local.shape != t.shape:
            raise MegaGPTError(f"{full_name}: shape {tuple(full_sd[full_name].shape)} does not fit this model "
                               f"(slice {tuple(local.shape)} vs {tuple(t.shape)})")
        t.copy_(local)


@torch.no_grad()
def gather_full(module, prefix, cfg, state) -> dict:
    """Serial-named full tensors of ``module``'s parameters, gathered across the TP group."""
    out = {}
    for name, t in module.state_dict().items():
        t = t.detach().contiguous()
        if state.tp_size > 1 and reshape.shard_kind(prefix + name) != "replicated":
            parts = [torch.empty_like(t) for _ in range(state.tp_size)]
            dist.all_gather(parts, t, group=state.tp_group)
        else:
            parts = [t]
        out[prefix + name] = reshape.merge(prefix + name, parts, cfg).clone()
    return out
