"""The one place the model asks for layer_norm / rms_norm / attention / cross_entropy (its tp=1
LM loss) / bias_gelu (its GELU MLP, only where ``fused`` says a fused kernel would run).

Backend choice: env ``MEGAGPT_KERNELS`` (a process-wide switch, so every rank of a launch agrees;
read on every call, so setting ``os.environ`` switches a running process too):
  auto      (default) fused Triton kernels for CUDA tensors, the PyTorch reference otherwise;
  reference always the reference;
  triton    Triton for every tensor (CPU tensors only when ``TRITON_INTERPRET=1``, i.e. tests);
  cuda      the CUDA C++ LayerNorm for layer_norm (JIT-built on first use), Triton for the rest.
Calls a fused kernel cannot serve (dropout > 0, an unsupported head dim, causal with Tq > Tk, …)
go to the reference with the reason logged. A missing/broken Triton or a failed CUDA build never
breaks training: it is reported once as a warning and that op falls back to the reference.
Each (op, backend, reason) choice is logged once at INFO. ``describe()`` reports the choice.
"""
import importlib
import logging
import os

import torch

from . import reference
from .triton import interpreting

log = logging.getLogger("megagpt.kernels")
MODES = ("auto", "reference", "triton", "cuda")
_TRITON_MODULES = {"layer_norm": "layer_norm", "rms_norm": "rms_norm", "attention": "flash_attention",
                   "cross_entropy": "cross_entropy", "bias_gelu": "bias_gelu"}
_logged: set = set()
_broken: dict = {}  # (backend, op) -> reason it cannot be used in this process


def backend_name() -> str:
    name = os.environ.get("MEGAGPT_KERNELS", "auto").lower()
    if name not in MODES:
        raise ValueError(f"MEGAGPT_KERNELS={name!r} is not one of {', '.join(MODES)}")
    return name


def reset() -> None:
    """Forget logged choices and remembered failures (tests; after fixing a toolchain)."""
    _logged.clear()
    _broken.clear()


def fallbacks() -> dict:
    """{(backend, op): reason} for every fused backend that failed in this process."""
    return dict(_broken)


def _load(backend: str, op: str):
    """The fused implementation, or None after warning (once) why it is unavailable."""
    if (backend, op) in _broken:
        return None
    try:
        if backend == "cuda":
            from .cuda import layer_norm as cuda_ln
            cuda_ln.load()
            return cuda_ln.layer_norm
        importlib.import_module("triton")
        return getattr(importlib.import_module(f"{__package__}.triton.{_TRITON_MODULES[op]}"), op)
    except Exception as e:  # ImportError, a build failure, a broken install: never fatal
        reason = f"{type(e).__name__}: {e}".strip()
        _broken[(backend, op)] = reason
        log.warning("megagpt kernels: %s %s unavailable (%s); falling back to reference", backend, op, reason)
        return None


def _plan(op: str, on_cuda: bool, why_not=None):
    """(backend, reason) before loading anything; backend in reference/triton/cuda."""
    mode = backend_name()
    if mode == "reference":
        return "reference", "MEGAGPT_KERNELS=reference"
    if mode == "auto" and not on_cuda:
        return "reference", "CPU tensors (auto)"
    if not on_cuda and not interpreting():
        return "reference", f"{mode} requested but tensors are on CPU and TRITON_INTERPRET is unset"
    if why_not:
        return "reference", why_not
    if mode == "cuda" and op == "layer_norm":
        return ("cuda", "MEGAGPT_KERNELS=cuda") if on_cuda else ("reference", "cuda layer_norm needs CUDA tensors")
    return "triton", f"MEGAGPT_KERNELS={mode}" + ("" if on_cuda else " with TRITON_INTERPRET=1")


def _resolve(op: str, on_cuda: bool, why_not=None):
    backend, reason = _plan(op, on_cuda, why_not)
    impl = None if backend == "reference" else _load(backend, op)
    if impl is None and backend != "reference":
        backend, reason = "reference", f"{backend} unavailable: {_broken[(backend, op)]}"
    return backend, reason, impl or getattr(reference, op)


def fused(op: str, on_cuda: bool) -> bool:
    """Whether ``op`` would run a fused kernel for CUDA (``on_cuda``) or CPU tensors. The model
    splits a computation for a fused op (a bias-free matmul before ``bias_gelu``) only then, so
    reference runs keep their exact arithmetic."""
    return _resolve(op, on_cuda)[0] != "reference"


def _pick(op: str, on_cuda: bool, why_not=None):
    backend, reason, impl = _resolve(op, on_cuda, why_not)
    if (op, backend, reason) not in _logged:
        _logged.add((op, backend, reason))
        log.info("megagpt kernels: %s -> %s (%s)", op, backend, reason)
    return impl


def describe(device=None, with_reasons: bool = False) -> dict:
    """Which backend each op would use for tensors on ``device`` (default: cuda if available)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    plans = {op: _resolve(op, dev.type == "cuda")[:2] for op in _TRITON_MODULES}
    return plans if with_reasons else {op: backend for op, (backend, _) in plans.items()}


def _call(op: str, on_cuda: bool, args, why_not=None):
    """Run the chosen impl; a Triton compile/resource failure (e.g. a tile config that exceeds this
    GPU's shared memory) marks the op broken, warns once and reruns on the reference. Errors in
    a fused *backward* kernel surface from autograd and are not caught here."""
    impl = _pick(op, on_cuda, why_not)
    ref = getattr(reference, op)
    if impl is ref:
        return ref(*args)
    try:
        return impl(*args)
    except Exception as e:
        if not type(e).__module__.startswith("triton"):
            raise
        backend = "cuda" if getattr(impl, "__module__", "").endswith(".cuda.layer_norm") else "triton"
        _broken[(backend, op)] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        log.warning("megagpt kernels: %s %s failed (%s); falling back to reference", backend, op,
                    _broken[(backend, op)])
        return ref(*args)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _call("layer_norm", x.is_cuda, (x, weight, bias, eps))


def rms_norm(x, weight, eps: float = 1e-6):
    return _call("rms_norm", x.is_cuda, (x, weight, eps))


def cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean CE over labels != ignore_index; logits (..., V), labels (...); returns an fp32 scalar."""
    return _call("cross_entropy", logits.is_cuda, (logits, labels, ignore_index))


def bias_gelu(x, bias, approximate: str = "none"):
    """gelu(x + bias); ``approximate`` is "none" (erf) or "tanh" as in torch."""
    return _call("bias_gelu", x.is_cuda, (x, bias, approximate))


def _attention_why_not(q, k, v, causal, dropout_p, doc_ids=None):
    if dropout_p > 0.0:  # checked without importing triton
        return f"dropout_p={dropout_p} > 0: the fused kernel is dropout-free"
    if backend_name() == "reference" or (not q.is_cuda and not interpreting()):
        return None
    try:
        from .triton.flash_attention import unsupported_reason
    except Exception:
        return None  # _load reports the broken import
    return unsupported_reason(q, k, v, causal, dropout_p, doc_ids)


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None, doc_ids=None):
    """``doc_ids`` (B, Tk) int: document masking of packed samples (a query sees only keys of its
    own document); None (the default) is plain attention and passes no mask to any backend."""
    why_not = _attention_why_not(q, k, v, causal, dropout_p, doc_ids)
    args = (q, k, v, causal, dropout_p, scale) if doc_ids is None else (q, k, v, causal, dropout_p, scale, doc_ids)
    return _call("attention", q.is_cuda, args, why_not)
