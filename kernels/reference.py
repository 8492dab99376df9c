"""Plain PyTorch references for every fused kernel: the CPU path and the ground truth in tests."""
import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype) if weight is not None else y.to(x.dtype)


def document_mask(doc_ids, tq: int, tk: int, causal: bool = True):
    """Boolean (B, 1, Tq, Tk) attention mask: True where query i (at key position Tk - Tq + i) and
    key j are in the same document (doc_ids (B, Tk), one id per key) and, if causal, j <= i."""
    same = doc_ids[:, tk - tq:, None] == doc_ids[:, None, :]
    if causal:
        same = same & torch.ones(tq, tk, dtype=torch.bool, device=doc_ids.device).tril(diagonal=tk - tq)
    return same[:, None]


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None, doc_ids=None):
    """q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0 (GQA/MQA). ``doc_ids`` (B, Tk):
    a query attends only to keys of its own document (packed samples); None builds no mask."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if doc_ids is not None:
        mask = document_mask(doc_ids, q.shape[2], k.shape[2], causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # With a KV cache Tq < Tk: query i sits at position Tk - Tq + i (bottom-right aligned mask).
    if causal and q.shape[2] != k.shape[2]:
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)


def cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean token cross-entropy over labels != ignore_index; logits (..., V), labels (...). fp32 loss.
    No counted label: 0 with zero gradient (F.cross_entropy's mean would be 0/0), without a host sync."""
    x = logits.reshape(-1, logits.shape[-1])
    x = x if x.dtype == torch.float64 else x.float()
    y = labels.reshape(-1)
    return F.cross_entropy(x, y, ignore_index=ignore_index, reduction="sum") / (y != ignore_index).sum().clamp(min=1)


def bias_gelu(x, bias, approximate: str = "none"):
    """gelu(x + bias) with torch's exact erf GELU or ``approximate="tanh"``; output dtype of x."""
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)
