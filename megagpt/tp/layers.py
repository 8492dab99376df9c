"""Megatron-style tensor-parallel layers on plain torch.distributed collectives.

Each communication is a named autograd pair (forward / backward):

    copy_to_tp         identity          all-reduce        replicated input -> column-parallel
    reduce_from_tp     all-reduce        identity          row-parallel partial sums -> replicated
    gather_from_tp     all-gather(dim)   take own chunk    vocab logits for sampling; a sequence-split
                                                           output for a replicated consumer
  sequence parallel (activations split along dim 1 = sequence):
    gather_from_seq    all-gather        reduce-scatter    before column-parallel
    reduce_scatter_seq reduce-scatter    all-gather        after row-parallel

Every collective is skipped when the group has one rank, so tp=1 layers are plain Linear/Embedding
(same numerics and names) with no process group.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _size(group):
    return dist.get_world_size(group) if group is not None else 1


# The collectives: (x, group, dim) -> tensor, called by a mapping only when the group has > 1 rank.
def _identity(x, group, dim):
    return x


def _reduce(x, group, dim):
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x, group, dim):
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunk(x, group, dim):
    return x.chunk(_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x, group, dim):
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: all-reduce, keep own chunk
        return _chunk(_reduce(x, group, dim), group, dim)
    parts = [p.contiguous() for p in x.chunk(_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _mapping(name, forward, backward):
    """A communication as a named autograd pair; identity (no autograd node) when the group has
    one rank, so tp=1 graphs are exactly the serial model's."""

    class Mapping(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group, dim):
            ctx.group, ctx.dim = group, dim
            return forward(x, group, dim)

        @staticmethod
        def backward(ctx, g):
            return backward(g, ctx.group, ctx.dim), None, None

    Mapping.__name__ = Mapping.__qualname__ = name

    def apply(x, group, dim=1):
        return Mapping.apply(x, group, dim) if _size(group) > 1 else x

    apply.__name__ = name
    return apply


copy_to_tp = _mapping("copy_to_tp", _identity, _reduce)
reduce_from_tp = _mapping("reduce_from_tp", _reduce, _identity)
gather_from_tp = _mapping("gather_from_tp", _all_gather, _chunk)
gather_from_seq = _mapping("gather_from_seq", _all_gather, _reduce_scatter)
reduce_scatter_seq = _mapping("reduce_scatter_seq", _reduce_scatter, _all_gather)


def mark_tp(param: nn.Parameter, tp) -> nn.Parameter:
    """Flag a parameter split across TP ranks (only at tp>1): DeepSpeed counts its grad norm on every
    TP rank, a replicated one's on TP rank 0 only."""
    if tp.size > 1:
        param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split along output rows (``out_features / tp`` each);
    the input is replicated (or, with sequence parallelism, sequence-split and all-gathered here)."""

    def __init__(self, in_features, out_features, bias, tp):
        super().__init__()
        self.group, self.sequence_parallel = tp.group, tp.sequence_parallel
        self.weight = mark_tp(nn.Parameter(torch.empty(out_features // tp.size, in_features)), tp)
        self.bias = mark_tp(nn.Parameter(torch.zeros(out_features // tp.size)), tp) if bias else None

    def forward(self, x):
        return column_parallel_linear(x, self.weight, self.bias, self.group, self.sequence_parallel)


def column_parallel_linear(x, weight, bias, group, sequence_parallel=False):
    """Replicate the input (all-gather it along the sequence under sequence parallelism), then
    this rank's output slice. Also the tied LM head of a pipeline's last stage."""
    x = gather_from_seq(x, group) if sequence_parallel else copy_to_tp(x, group)
    return F.linear(x, weight, bias)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local W_local^T + b, W split along input columns; the output is
    all-reduced (or reduce-scattered along the sequence). The bias is replicated and added once."""

    def __init__(self, in_features, out_features, bias, tp):
        super().__init__()
        self.group, self.sequence_parallel = tp.group, tp.sequence_parallel
        self.weight = mark_tp(nn.Parameter(torch.empty(out_features, in_features // tp.size)), tp)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        if self.bias is None:
            return y
        # under sequence parallelism each rank's bias grad covers only its chunk: sum them across TP
        return y + (copy_to_tp(self.bias, self.group) if self.sequence_parallel else self.bias)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the (padded) table on each rank; ids outside are looked
    up as row 0 and zeroed, then partial results are summed across TP (reduce-scattered along
    the sequence with sequence parallelism)."""

    def __init__(self, padded_vocab, dim, tp):
        super().__init__()
        self.group, self.sequence_parallel = tp.group, tp.sequence_parallel
        per = padded_vocab // tp.size
        self.vocab_start, self.vocab_end = tp.rank * per, (tp.rank + 1) * per
        self.weight = mark_tp(nn.Parameter(torch.empty(per, dim)), tp)

    def forward(self, ids):
        if _size(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)
