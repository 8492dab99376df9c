"""Autoregressive sampling from a GPT: greedy, temperature, top-k and top-p (nucleus).

Batched prompts must all have the same length (no left padding). Prompt plus new tokens must fit
in ``max_seq_len`` (so cached and uncached generation always see the same context). With ``eos_id``,
a finished row keeps emitting it, and generation stops once every row has.
"""
import torch

from megagpt.errors import MegaGPTError


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / top-p support to -inf. logits: (B, V) float."""
    if top_k is not None:
        if top_k < 1:
            raise MegaGPTError(f"top_k={top_k} must be >= 1")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise MegaGPTError(f"top_p={top_p} must be in (0, 1]")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _as_batch(prompt_ids, device):
    if not torch.is_tensor(prompt_ids) and prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
        lengths = sorted({len(row) for row in prompt_ids})
        if len(lengths) > 1:
            raise MegaGPTError(f"batched prompts must have equal length, got {lengths}")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise MegaGPTError(f"prompt_ids must be a non-empty list or (B, T) tensor, got shape {tuple(ids.shape)}")
    return ids, squeeze


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
             eos_id=None, use_kv_cache: bool = True, generator=None):
    """Prompt plus up to ``max_new_tokens`` sampled ids: a (B, T + n) LongTensor, or 1-D if the
    prompt was 1-D (a list of ints or a 1-D tensor). ``temperature == 0`` is greedy decoding."""
    if temperature < 0:
        raise MegaGPTError(f"temperature={temperature} must be >= 0")
    device = next(model.parameters()).device
    ids, squeeze = _as_batch(prompt_ids, device)
    if ids.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        raise MegaGPTError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                           f"max_seq_len={model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache() if use_kv_cache else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, cache.length:] if use_kv_cache else ids, kv_cache=cache)[:, -1, :].float()
        if temperature == 0:
            next_id = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if eos_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
            finished |= next_id == eos_id
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return ids[0] if squeeze else ids
