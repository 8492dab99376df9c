"""Cross-entropy over vocab-parallel logits without ever gathering the full vocabulary.

Each TP rank holds logits for ids [vocab_start, vocab_start + V_local). Three all-reduces of one
number per token (max, sum of exp, the target's logit) give the exact loss; the gradient softmax -
onehot is formed locally. Padded ids (>= vocab_size) are masked to -inf, as the serial model slices them off.
"""
import torch
import torch.distributed as dist

from megagpt.errors import MegaGPTError

IGNORE_INDEX = -100


def _all_reduce(x, group, op=dist.ReduceOp.SUM):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, vocab_size):
        logits = logits.float()
        v_local = logits.shape[-1]
        ids = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
        m = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        valid = labels != IGNORE_INDEX
        mine = valid & (labels >= vocab_start) & (labels < vocab_start + v_local)
        local = torch.where(mine, labels - vocab_start, torch.zeros_like(labels))
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target = _all_reduce(torch.where(mine, target, torch.zeros_like(target)), group)
        loss = torch.where(valid, sum_exp.log() - target, torch.zeros_like(target))
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[mine], local[mine]] -= 1.0
        grad = grad * (g * valid).unsqueeze(-1)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits_local, labels, group, vocab_start: int, vocab_size: int):
    """Mean token cross-entropy (labels == -100 ignored) of logits_local (..., V_local), this rank's
    slice of the vocabulary; labels (...) are global ids. Same value on every TP rank."""
    flat_labels = labels.reshape(-1)
    bad = (flat_labels != IGNORE_INDEX) & ((flat_labels < 0) | (flat_labels >= vocab_size))
    if bad.any():
        raise MegaGPTError(f"label id {int(flat_labels[bad][0])} outside the vocabulary [0, {vocab_size})")
    per_token = _VocabParallelCE.apply(logits_local.reshape(-1, logits_local.shape[-1]), flat_labels,
                                       group, vocab_start, vocab_size)
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / count
