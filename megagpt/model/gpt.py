"""The GPT decoder: GPT-1 (post-LN), GPT-2 (pre-LN) and Llama-style blocks from one ModelConfig.

Parameter names (stable: checkpoints, the HF exporter and tensor parallelism map these):

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
    lm_head.weight                (padded_vocab, n_embd); with tie_embeddings it *is* embed.tok.weight
                                  (one Parameter: state_dict lists both keys, parameters() one)

Block order. post ("GPT-1"): x = ln1(x + attn(x)); x = ln2(x + mlp(x)).
             pre  ("GPT-2"): x = x + attn(ln1(x)); x = x + mlp(ln2(x)); ln_f after the last block.

Padded vocabulary: embedding/lm_head rows beyond ``vocab_size`` exist only for matmul speed and
even tensor-parallel splits. ``forward`` returns logits sliced to ``vocab_size`` (padded ids can
never be predicted or sampled, and logits match an HF model of ``vocab_size`` directly); the loss
is computed on the same sliced logits.
"""
import logging
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megagpt.errors import MegaGPTError
from megagpt_kernels import dispatch

from .attention import CausalSelfAttention, KVCache
from .config import ModelConfig
from .embedding import Embedding, rope_cos_sin
from .mlp import MLP
from .norm import LayerNorm, RMSNorm, make_norm

log = logging.getLogger("megagpt.model")


def activation_checkpoint(fn, *args):
    """Recompute ``fn(*args)`` in backward instead of storing its activations.

    The one checkpoint call in the model; set ``GPT.checkpoint_fn`` to swap it (e.g. DeepSpeed's).
    """
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv_cache=None):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope, kv_cache)
            x = x + self.mlp(self.ln2(x))
        else:
            x = self.ln1(x + self.attn(x, rope, kv_cache))
            x = self.ln2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.tie_weights()
        self.checkpoint_fn = activation_checkpoint
        self.init_weights()
        log.info(
            "GPT %s: %s params (%s non-embedding), %d layers, width %d, kernels=%s",
            cfg.name, f"{self.num_params():,}", f"{self.num_params(non_embedding=True):,}",
            cfg.n_layer, cfg.n_embd, dispatch.backend_name(),
        )

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def _apply(self, fn, *args, **kwargs):
        # Conversions that create new Parameters (to_empty from meta, swapped params) would untie.
        super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        return self

    def init_weights(self) -> None:
        """N(0, init_std) weights, zero biases, unit norms; output projections scaled when configured."""
        cfg = self.cfg
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = cfg.init_std
                if cfg.scaled_residual_init and name.endswith(("attn.proj", "mlp.proj")):
                    std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)

    # ---- forward ------------------------------------------------------------------------
    # forward = embed_inputs -> blocks -> final_norm -> logits (-> loss); the pieces are public so
    # pipeline stages and tensor-parallel heads can reuse them.
    def embed_inputs(self, input_ids, start: int = 0):
        """Embedded tokens (B, T, n_embd) at positions start.., and the rope (cos, sin) or None."""
        cfg = self.cfg
        T = input_ids.shape[1]
        if start + T > cfg.max_seq_len:
            raise MegaGPTError(
                f"sequence of {start + T} tokens (cached {start} + new {T}) exceeds max_seq_len={cfg.max_seq_len}"
            )
        positions = torch.arange(start, start + T, device=input_ids.device)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta) if cfg.pos_emb == "rope" else None
        return self.embed(input_ids, positions), rope

    def final_norm(self, x):
        return self.ln_f(x) if self.ln_f is not None else x

    def forward_hidden(self, input_ids, kv_cache: KVCache = None):
        """Final hidden states (B, T, n_embd): after ln_f (pre-LN) or the last block (post-LN)."""
        start = kv_cache.seq_len if kv_cache is not None else 0
        x, rope = self.embed_inputs(input_ids, start)
        checkpointing = self.cfg.activation_checkpointing and self.training and kv_cache is None
        for block in self.blocks:
            if checkpointing:
                x = self.checkpoint_fn(block, x, rope)
            else:
                x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.seq_len = start + input_ids.shape[1]
        return self.final_norm(x)

    def logits(self, hidden):
        """lm_head output sliced to vocab_size: padded ids are never predicted."""
        return self.lm_head(hidden)[..., : self.cfg.vocab_size]

    def forward(self, input_ids, labels=None, kv_cache: KVCache = None):
        """Logits (B, T, vocab_size), or the mean cross-entropy over labels != -100 if given.

        Labels are already aligned with the inputs (labels[t] is the token after input_ids[t]).
        """
        logits = self.logits(self.forward_hidden(input_ids, kv_cache))
        if labels is None:
            return logits
        if labels.shape != input_ids.shape:
            raise MegaGPTError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    # ---- accounting ---------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights once). non_embedding drops token/position tables and
        lm_head (Kaplan et al.'s N)."""
        skip = set()
        if non_embedding:
            skip = {id(self.embed.tok.weight), id(self.lm_head.weight)}
            if self.embed.pos is not None:
                skip.add(id(self.embed.pos.weight))
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12*L*H*Q*T.

        N = non-embedding parameters + the lm_head matmul (padded_vocab * n_embd): every weight
        that takes part in a matmul per token; embedding lookups cost no FLOPs.
        """
        cfg = self.cfg
        n = self.num_params(non_embedding=True) + cfg.padded_vocab_size * cfg.n_embd
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
