"""megagpt as an lm-evaluation-harness model: ``lm_eval --model megagpt --model_args checkpoint=DIR``.

Any checkpoint ``megagpt.checkpoint.load_model`` reads (DeepSpeed at any ZeRO stage and TP/PP
layout, consolidated, HF dir) with its own tokenizer, or a live ``GPT`` + ``Tokenizer`` (the
periodic evaluation during pretraining). Scoring follows the harness's HF backend, so the same
model exported to HF gets the same numbers from ``--model hf``:

* loglikelihood: context + continuation, left-truncated to ``max_seq_len + 1`` tokens, the last
  dropped; requests sorted longest first, right-padded, one forward per batch; the continuation's
  log-probs (fp32 log-softmax) summed, and whether each was the argmax.
* loglikelihood_rolling: the harness's disjoint rolling windows of ``max_seq_len`` tokens,
  the first conditioned on ``prefix_token_id``.
* generate_until: greedy, megagpt's KV-cache ``generate``; the context left-truncated to leave
  ``max_gen_toks`` room; cut at the first ``until`` string (the eos token ends it too).

The empty-context prefix token is eos (= eod): pretraining puts it before every document, so it is
what the model has seen start a text (the HF backend would pick bos; pass it ``prefix_token_id``).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megagpt.errors import MegaGPTError


@register_model("megagpt")
class MegaGPTLM(TemplateLM):
    """A megagpt model for lm-eval. ``checkpoint`` (+ ``tag``, ``tokenizer``) or ``model`` + ``tok``."""

    def __init__(self, checkpoint=None, tag=None, tokenizer=None, model=None, tok=None, batch_size=8,
                 device="cpu", max_gen_toks=256, dtype="float32", max_batch_size=None):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise MegaGPTError("megagpt model: pass checkpoint=DIR (or model= and tok=)")
            from megagpt.checkpoint import load_model

            model, tok, _ = load_model(checkpoint, tag=tag, tokenizer=tokenizer)
            if tok is None:
                raise MegaGPTError(f"{checkpoint}: the checkpoint holds no tokenizer; pass tokenizer=PATH")
        if tok is None or tok.eos_id is None:
            raise MegaGPTError("megagpt model: a tokenizer with an eos/eod id is needed")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise MegaGPTError(f"dtype={dtype!r}: expected one of {', '.join(dtypes)}")
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise MegaGPTError(f"batch_size={batch_size!r}: expected a whole number (no 'auto')") from None
        if self._batch_size < 1:
            raise MegaGPTError(f"batch_size={batch_size}: must be >= 1")
        try:
            self._device = torch.device(device or "cpu")
        except RuntimeError:
            raise MegaGPTError(f"device={device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise MegaGPTError(f"device={device!r}: this torch has no usable CUDA device; use cpu")
        self.model = model.to(self._device, dtypes[dtype]).eval()
        self.tok = tok
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ what the harness asks
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(next(self.model.parameters()).dtype),
                "megagpt_model": self.model.cfg.name}

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per ``(context, continuation)`` request: the
        harness's tokenization (``TemplateLM``: trailing context spaces move to the continuation,
        an empty context becomes ``prefix_token_id``), then ``_loglikelihood_tokens``."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not sys.stderr.isatty())

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, T, V) fp32 log-softmax of one right-padded batch (padding never reaches earlier positions)."""
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return F.log_softmax(self.model(ids.to(self._device)).float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[(key, context ids, continuation ids)]`` → ``[(sum log p(continuation), greedy?)]``, in order."""
        n = self.max_length
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        for start in range(0, len(order), self._batch_size):
            batch = order[start:start + self._batch_size]
            rows, conts = [], []
            for i in batch:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise MegaGPTError(f"request {requests[i][0]!r}: empty context or continuation after tokenizing")
                if len(cont) > n:
                    raise MegaGPTError(f"request {requests[i][0]!r}: a {len(cont)}-token continuation does not fit "
                                       f"max_seq_len={n}")
                rows.append((ctx + cont)[-(n + 1):][:-1])
                conts.append(cont)
            logp = self._logprobs(rows)
            for i, row, cont, lp in zip(batch, rows, conts, logp):
                lp = lp[len(row) - len(cont): len(row)]     # the positions that predict the continuation
                target = torch.tensor(cont, dtype=torch.long)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole text's log-likelihood, window by window (``max_seq_len`` tokens each)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, req in enumerate(requests):
            for w in get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched by equal (truncated) context length and equal settings."""
        from megagpt.model import generate

        jobs = {}
        for k, req in enumerate(requests):
            context, kw = req.args
            until, budget = self._generation_settings(kw)
            ids = self.tok_encode(context)[-(self.max_length - budget):] or [self.prefix_token_id]
            jobs.setdefault((len(ids), budget, tuple(until)), []).append((k, ids))
        out: list = [None] * len(requests)
        for (_, budget, until), group in sorted(jobs.items(), key=lambda kv: -kv[0][0]):
            for start in range(0, len(group), self._batch_size):
                part = group[start:start + self._batch_size]
                gen = generate(self.model, [ids for _, ids in part], budget, temperature=0.0, eos_id=self.eot_token_id)
                for (k, ids), row in zip(part, gen.tolist()):
                    text = self.tok_decode(row[len(ids):])
                    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                    out[k] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[k].args, out[k])
        return out

    def _generation_settings(self, kw) -> tuple[list[str], int]:
        kw = dict(kw or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(kw.pop("max_gen_toks", self.max_gen_toks))
        if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
            raise MegaGPTError("megagpt harness model decodes greedily: do_sample/temperature > 0 are not supported")
        if not 1 <= budget < self.max_length:
            raise MegaGPTError(f"max_gen_toks={budget}: must be in 1..{self.max_length - 1} (max_seq_len "
                               f"{self.max_length} must leave room for the context)")
        return until, budget
