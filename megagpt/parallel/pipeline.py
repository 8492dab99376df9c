"""Pipeline parallelism with DeepSpeed's PipelineModule, and the one entry for any layout.

Layer list (indices are what DeepSpeed's ``layer_XX-model_YY-model_states.pt`` files number):

    0        TiedLayerSpec("tok")  vocab-parallel token embedding      (first stage)
    1        PosDropPipe           + learned positions, embedding dropout
    2..L+1   BlockPipe             one TPBlock each
    L+2      FinalNormPipe         ln_f (pre-LN only)
    last     TiedLayerSpec("tok", forward_fn=lm_head)  the same table as output weight (tied), or
             LMHeadPipe (untied); the loss is the vocab-parallel cross-entropy on the last stage.

DeepSpeed keeps the tied table on the first and last stages and all-reduces its gradient between
them. 1F1B scheduling is DeepSpeed's (``engine.train_batch(data_iter)``): only the first stage
(input_ids) and the last stage (labels) call ``next(data_iter)``; other stages need no data.

ZeRO: DeepSpeed 0.19.8's PipelineEngine asserts ``zero stage < 2`` ("ZeRO-2 and ZeRO-3 are
incompatible with pipeline parallelism"); ``check_zero_stage`` refuses such configs up front.
"""
import functools

import torch
import torch.distributed as dist
from torch import nn

from megagpt.errors import MegaGPTError

from . import reshape
from .random import checkpoint as tp_checkpoint
from .tp_model import (TPBlock, TPGPT, TPNorm, _Dropout, gather_full, init_tp_weights, load_local,
                       lm_logits_local, rope_for, sync_replicated, tp_loss)
from .tensor_parallel import VocabParallelEmbedding, copy_to_tp


class TokPipe(VocabParallelEmbedding):
    full_prefix = "embed.tok."

    def __init__(self, cfg, state):
        super().__init__(cfg.padded_vocab_size, cfg.n_embd, state.tp_group, state.tp_rank, state.tp_size,
                         state.sequence_parallel)


class PosDropPipe(nn.Module):
    full_prefix = "embed.pos."

    def __init__(self, cfg, state):
        super().__init__()
        self.state = state
        if cfg.pos_emb == "learned":
            self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.n_embd))
        else:
            self.weight = None
        self.drop = _Dropout(cfg.embd_dropout, state)

    def forward(self, x):
        if self.weight is not None:
            s = self.state
            n = x.shape[1]
            start = s.tp_rank * n if s.sequence_parallel else 0
            w = copy_to_tp(self.weight, s.tp_group) if s.sequence_parallel else self.weight
            x = x + w[start:start + n]
        return self.drop(x)


class BlockPipe(TPBlock):
    def __init__(self, cfg, state, layer_idx):
        super().__init__(cfg, state)
        self.cfg, self.state, self.full_prefix = cfg, state, f"blocks.{layer_idx}."

    def forward(self, x):
        T = x.shape[1] * (self.state.tp_size if self.state.sequence_parallel else 1)
        return super().forward(x, rope_for(self.cfg, T, x.device))


class FinalNormPipe(TPNorm):
    full_prefix = "ln_f."


class LMHeadPipe(nn.Module):
    full_prefix = "lm_head."

    def __init__(self, cfg, state):
        super().__init__()
        self.state = state
        self.weight = nn.Parameter(torch.empty(cfg.padded_vocab_size // state.tp_size, cfg.n_embd))
        self.weight.tensor_model_parallel = True

    def forward(self, x):
        return lm_logits_local(x, self.weight, self.state)


def _tied_head(module, x, state):
    return lm_logits_local(x, module.weight, state)


def _loss(logits_local, labels, cfg, state):
    return tp_loss(logits_local, labels, cfg, state)


def build_pipeline_model(cfg, state):
    """A deepspeed.pipe.PipelineModule over ``state``'s topology (TP inside each stage)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    reshape.check_tp(cfg, state.tp_size)
    pc = state.config
    layers = [TiedLayerSpec("tok", TokPipe, cfg, state, tied_weight_attr="weight") if cfg.tie_embeddings
              else LayerSpec(TokPipe, cfg, state),
              LayerSpec(PosDropPipe, cfg, state)]
    layers += [LayerSpec(BlockPipe, cfg, state, i) for i in range(cfg.n_layer)]
    if cfg.norm_position == "pre":
        layers.append(LayerSpec(FinalNormPipe, cfg, state))
    if cfg.tie_embeddings:
        layers.append(TiedLayerSpec("tok", TokPipe, cfg, state, tied_weight_attr="weight",
                                    forward_fn=functools.partial(_tied_head, state=state)))
    else:
        layers.append(LayerSpec(LMHeadPipe, cfg, state))
    if len(layers) < state.pp_size:
        raise MegaGPTError(f"pipeline_parallel={state.pp_size} exceeds the {len(layers)} pipeline layers "
                           f"of a {cfg.n_layer}-layer model")
    module = PipelineModule(
        layers=layers, topology=state.topology(), loss_fn=functools.partial(_loss, cfg=cfg, state=state),
        partition_method=pc.partition_method, activation_checkpoint_interval=pc.activation_checkpoint_interval,
        activation_checkpoint_func=functools.partial(tp_checkpoint, state.rng))
    for m in _pipe_layers(module):
        init_tp_weights(m, cfg, state)
        sync_replicated(m, state)
    module._synchronize_tied_weights()
    module.cfg, module.parallel_state = cfg, state
    return module


def _pipe_layers(module):
    seen = {}
    for m in module.modules():
        if hasattr(m, "full_prefix") and id(m) not in seen:
            seen[id(m)] = m
    return list(seen.values())


def load_pipeline_from_full_state_dict(module, full_sd) -> None:
    for m in _pipe_layers(module):
        load_local(m, m.full_prefix, full_sd, module.cfg, module.parallel_state)


def pipeline_full_state_dict(module) -> dict:
    """Serial-named full state dict, gathered over TP inside each stage and then over stages."""
    cfg, state = module.cfg, module.parallel_state
    mine = {}
    for m in _pipe_layers(module):
        mine.update(gather_full(m, m.full_prefix, cfg, state))
    if cfg.pos_emb != "learned":
        mine.pop("embed.pos.weight", None)
    parts = [None] * state.pp_size
    dist.all_gather_object(parts, {k: v.cpu() for k, v in mine.items()}, group=state.pp_group)
    full = {}
    for p in parts:
        for k, v in p.items():
            full.setdefault(k, v)
    if cfg.tie_embeddings:
        full["lm_head.weight"] = full["embed.tok.weight"]
    return full


# ---- one entry for every layout ----------------------------------------------------------------

def check_zero_stage(ds_config: dict, state) -> None:
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if state.pp_size > 1 and stage >= 2:
        raise MegaGPTError(
            f"zero_optimization.stage={stage} cannot be combined with pipeline_parallel={state.pp_size}: "
            "DeepSpeed's PipelineEngine supports ZeRO stage 0 or 1 only (use stage 1, or pipeline_parallel=1)")


def prepare_ds_config(ds_config: dict, state) -> dict:
    """Check ``ds_config`` against the layout and return a copy with what the layout needs.

    With TP inside a pipeline DeepSpeed by default sends each stage boundary's activation (and
    gradient) as 1/TP slices and all-gathers them on the receiver ("pipe_partitioned",
    "grad_partitioned"), which assumes activations are replicated across TP ranks. Under
    sequence parallelism each TP rank holds a different sequence chunk, so both are turned off.
    """
    check_zero_stage(ds_config, state)
    cfg = dict(ds_config)
    if state.pp_size > 1 and state.sequence_parallel:
        pipe = dict(cfg.get("pipeline") or {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key) is True:
                raise MegaGPTError(f"pipeline.{key}=true cannot be used with sequence_parallel "
                                   "(activations differ across tensor-parallel ranks); remove it")
            pipe[key] = False
        cfg["pipeline"] = pipe
    return cfg


def build_model(cfg, state):
    """Serial GPT (tp=pp=1), TPGPT (tp>1, pp=1) or a PipelineModule (pp>1, any tp)."""
    if state.pp_size > 1:
        return build_pipeline_model(cfg, state)
    if state.tp_size > 1:
        return TPGPT(cfg, state)
    from megagpt.model import GPT

    return GPT(cfg)


def load_full_state_dict(model, full_sd) -> None:
    """Load serial-named full weights into a model of any layout."""
    if hasattr(model, "load_from_full_state_dict"):
        model.load_from_full_state_dict(full_sd)
    elif hasattr(model, "parallel_state"):
        load_pipeline_from_full_state_dict(model, full_sd)
    else:
        missing, unexpected = model.load_state_dict(full_sd, strict=False)
        if missing or unexpected:
            raise MegaGPTError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")


def full_state_dict(model) -> dict:
    """Serial-named full weights of a model of any layout (collective over TP/PP groups)."""
    engine, model = model, getattr(model, "module", model)       # a DeepSpeed engine, or a model
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:   # parameters are partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return full_state_dict(model)
    if hasattr(model, "full_state_dict"):
        return model.full_state_dict()
    if hasattr(model, "parallel_state"):
        return pipeline_full_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def named_parameters_serial(model):
    """(serial GPT name, local parameter) pairs for any layout, each parameter once — for rules
    keyed on names (weight-decay groups) that must not depend on the layout."""
    model = getattr(model, "module", model)
    if not hasattr(model, "parallel_state"):
        return list(model.named_parameters())
    seen, out = set(), []
    for m in _pipe_layers(model):
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((m.full_prefix + name, p))
    return out


def model_stats(cfg, seq_len: int) -> tuple:
    """(total parameters, training FLOPs per token) of the whole (unsplit) model, for metrics."""
    from megagpt.model import GPT

    with torch.device("meta"):
        g = GPT(cfg)
    return g.num_params(), g.flops_per_token(seq_len)


def train_step(engine, batch_iter, state) -> torch.Tensor:
    """One optimizer step: gradient_accumulation_steps micro-batches of (input_ids, labels).

    Pipeline: DeepSpeed's 1F1B ``train_batch`` (only first/last stages read ``batch_iter``; pass
    None elsewhere). Otherwise forward/backward per micro-batch and one ``step``. Returns the mean
    micro-batch loss (on every rank of the pipeline).
    """
    if state.pp_size > 1:
        return engine.train_batch(data_iter=batch_iter if state.needs_data else None)
    losses = []
    for _ in range(engine.gradient_accumulation_steps()):
        input_ids, labels = next(batch_iter)
        loss = engine(input_ids, labels=labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()
