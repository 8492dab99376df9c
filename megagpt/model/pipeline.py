"""Pipeline stages for DeepSpeed's PipelineModule: thin wrappers over the GPT's own modules.

Layer list (the indices of DeepSpeed's ``layer_XX-model_YY-model_states.pt``, named by
``sharding.pipeline_layer_prefixes``):

    0        TokStage      the vocab-parallel token table           (TiedLayerSpec "tok" when tied)
    1        PosStage      + learned positions, embedding dropout  (no parameters with RoPE)
    2..L+1   BlockStage    one GPT ``Block`` each
    L+2      NormStage     ln_f (pre-LN only)
    last     the token table again as the output weight (tied; DeepSpeed all-reduces its gradient
             between first and last stage), or HeadStage (untied). The loss is ``lm_loss``.

Document masking (``data.reset_attention_mask``/``reset_position_ids``) is refused with pipelines at
config load: stages pass only the hidden states, not a batch's document ids or positions.

Each stage module carries ``full_prefix``, the serial-name prefix of its parameters, so the GPT's
initial weights, full-state-dict gather/load and name-keyed rules (weight decay) apply unchanged.
"""
import functools

import torch.distributed as dist

from megagpt.errors import MegaGPTError
from megagpt.tp.layers import ColumnParallelLinear, VocabParallelEmbedding, column_parallel_linear
from megagpt.tp.random import checkpoint as tp_checkpoint

from .embedding import Dropout, Positions, rope_cos_sin
from .gpt import Block, gather_slices, init_params, lm_loss, load_slices
from .norm import Norm
from .sharding import check_tp, with_tied_names


class TokStage(VocabParallelEmbedding):
    full_prefix = "embed.tok."

    def __init__(self, cfg, tp):
        super().__init__(cfg.padded_vocab_size, cfg.n_embd, tp)


def tied_head(module, x):
    """The last stage's use of the tied token table: the LM head's column-parallel matmul."""
    return column_parallel_linear(x, module.weight, None, module.group, module.sequence_parallel)


class PosStage(Positions):
    full_prefix = "embed.pos."

    def __init__(self, cfg, tp):
        super().__init__(cfg, tp)
        self.drop = Dropout(cfg.embd_dropout, tp)

    def forward(self, x):
        return self.drop(super().forward(x))


class BlockStage(Block):
    def __init__(self, cfg, tp, layer_idx):
        super().__init__(cfg, layer_idx, tp)
        self.cfg, self.tp, self.full_prefix = cfg, tp, f"blocks.{layer_idx}."

    def forward(self, x):
        T = x.shape[1] * (self.tp.size if self.tp.sequence_parallel else 1)
        return super().forward(x, rope_cos_sin(self.cfg, 0, T, x.device))


class NormStage(Norm):
    full_prefix = "ln_f."


class HeadStage(ColumnParallelLinear):
    full_prefix = "lm_head."

    def __init__(self, cfg, tp):
        super().__init__(cfg.n_embd, cfg.padded_vocab_size, False, tp)


def build_pipeline(cfg, par):
    """A deepspeed.pipe.PipelineModule over ``par``'s topology (TP inside each stage), its weights
    the GPT's initial weights (the caller seeds the default generator identically on every rank)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tp = par.tp
    check_tp(cfg, tp.size)
    tok = TiedLayerSpec("tok", TokStage, cfg, tp, tied_weight_attr="weight") if cfg.tie_embeddings \
        else LayerSpec(TokStage, cfg, tp)
    layers = [tok, LayerSpec(PosStage, cfg, tp)] + [LayerSpec(BlockStage, cfg, tp, i) for i in range(cfg.n_layer)]
    if cfg.norm_position == "pre":
        layers.append(LayerSpec(NormStage, cfg, tp))
    layers.append(TiedLayerSpec("tok", TokStage, cfg, tp, tied_weight_attr="weight", forward_fn=tied_head)
                  if cfg.tie_embeddings else LayerSpec(HeadStage, cfg, tp))
    if len(layers) < par.pp_size:
        raise MegaGPTError(f"pipeline_parallel={par.pp_size} exceeds the {len(layers)} pipeline layers "
                           f"of a {cfg.n_layer}-layer model")
    module = PipelineModule(
        layers=layers, topology=par.topology(), loss_fn=functools.partial(lm_loss, cfg=cfg, tp=tp),
        partition_method=par.config.partition_method,
        activation_checkpoint_interval=par.config.activation_checkpoint_interval,
        activation_checkpoint_func=functools.partial(tp_checkpoint, tp.rng))
    module.cfg, module.parallel_state = cfg, par
    init_params(stage_parameters(module), cfg, tp)
    module._synchronize_tied_weights()
    return module


def stage_parameters(module) -> dict:
    """{serial name: parameter} of this rank's pipeline stage (modules() yields a tied stage once)."""
    return {m.full_prefix + name: p for m in module.modules() if hasattr(m, "full_prefix")
            for name, p in m.named_parameters()}


def load_pipeline(module, full_sd: dict) -> None:
    load_slices(stage_parameters(module), full_sd, module.cfg, module.parallel_state.tp)


def pipeline_full_state_dict(module) -> dict:
    """Serial-named full state dict, gathered over TP inside each stage and then over stages."""
    cfg, par = module.cfg, module.parallel_state
    return with_tied_names(gather_stages(gather_slices(stage_parameters(module), cfg, par.tp), par), cfg)


def gather_stages(tensors: dict, par) -> dict:
    """Every pipeline stage's serial-named tensors, on every rank (a tied table: the first stage's)."""
    parts = [None] * par.pp_size
    dist.all_gather_object(parts, {k: v.cpu() for k, v in tensors.items()}, group=par.pp_group)
    full = {}
    for part in parts:
        full.update((k, v) for k, v in part.items() if k not in full)
    return full

