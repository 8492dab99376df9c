"""GPT-1 task heads on ``GPT.forward_hidden`` and the loss L3 = L2 + λ·L1 (L1: the auxiliary LM loss
on the same tokens). The head reads each row's ``<cls>`` state (rows are right-padded: not the last column):

  classification / entailment   W_y · dropout(h_cls)                  → (B, C) logits
  similarity                    W_y · dropout(h_cls(a,b) + h_cls(b,a)) → (B, C), or (B,) score
  multiple choice               w · dropout(h_cls(ctx, ans_k))         → (B, K) scores, softmax over k
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.errors import MegaGPTError


class FinetuneModel(nn.Module):
    def __init__(self, gpt, kind: str, num_outputs: int, regression: bool = False,
                 clf_dropout: float = 0.1, lm_coef: float = 0.5):
        super().__init__()
        if kind not in ("classification", "entailment", "similarity", "multiple_choice"):
            raise MegaGPTError(f"unknown task kind {kind!r}")
        if regression and kind != "similarity":
            raise MegaGPTError("a regression head is only defined for similarity tasks (STS-B)")
        self.gpt, self.kind, self.regression, self.lm_coef = gpt, kind, regression, lm_coef
        self.dropout = nn.Dropout(clf_dropout)
        self.head = nn.Linear(gpt.cfg.n_embd, 1 if kind == "multiple_choice" else num_outputs)
        nn.init.normal_(self.head.weight, std=0.02)   # GPT-1: same init as the body
        nn.init.zeros_(self.head.bias)

    def task_output(self, hidden, cls_pos, batch_size):
        """(N, T, H) hidden of N = B*views rows → (B, C) logits, (B,) scores or (B, K) choice scores."""
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), cls_pos]   # (N, H)
        views = h.size(0) // batch_size
        if views * batch_size != h.size(0):
            raise MegaGPTError(f"{h.size(0)} sequences do not split into {batch_size} examples")
        if self.kind == "similarity":
            h = h.view(batch_size, views, -1).sum(1)          # order-invariant by construction
        elif self.kind != "multiple_choice" and views != 1:
            raise MegaGPTError(f"{self.kind} expects one sequence per example, got {views}")
        out = self.head(self.dropout(h))
        if self.kind == "multiple_choice":
            return out.view(batch_size, views)                # (B, K)
        return out.squeeze(-1) if self.regression else out

    def forward(self, input_ids, cls_pos, lm_labels=None, labels=None, batch_size: int = None):
        """Returns (loss or None, task output, {"task": L2, "lm": L1}). ``batch_size`` = number of
        examples (rows are views of them in order: example 0's views first)."""
        B = batch_size if batch_size is not None else (labels.size(0) if labels is not None else input_ids.size(0))
        hidden = self.gpt.forward_hidden(input_ids)
        out = self.task_output(hidden, cls_pos, B)
        if labels is None:
            return None, out, {}
        loss = task_loss = (F.mse_loss(out.float(), labels.float()) if self.regression
                            else F.cross_entropy(out.float(), labels.long()))
        parts = {"task": task_loss.detach()}
        if self.lm_coef and lm_labels is not None:
            lm_loss = self.gpt.lm_loss_from_hidden(hidden, lm_labels)   # vocab-parallel at tp > 1
            loss = task_loss + self.lm_coef * lm_loss
            parts["lm"] = lm_loss.detach()
        return loss, out, parts

    def probabilities(self, out):
        """Softmax over classes, or over the K answers of multiple choice: (B, C) / (B, K)."""
        if self.regression:
            raise MegaGPTError("a regression head has no probabilities")
        return out.float().softmax(-1)

    @torch.no_grad()
    def predict(self, out):
        """Task output → predictions: class ids, choice ids, or regression scores."""
        return out.float() if self.regression else out.argmax(-1)
