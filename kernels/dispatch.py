"""The one place the model asks for layer_norm / rms_norm / attention.

Backend choice: env ``MEGAGPT_KERNELS`` = ``auto`` (default: fused on CUDA, reference otherwise),
``reference`` or ``triton``. The choice is logged once per op. (The fused backends are added by
the kernels issue; until then every op resolves to the reference.)
"""
import logging
import os

from . import reference

log = logging.getLogger("megagpt.kernels")
_logged: set = set()


def backend_name() -> str:
    return os.environ.get("MEGAGPT_KERNELS", "auto").lower()


def _pick(op: str, x):
    impl, why = getattr(reference, op), "reference (no fused backend available)"
    if (op, why) not in _logged:
        _logged.add((op, why))
        log.info("megagpt kernels: %s -> %s", op, why)
    return impl


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _pick("layer_norm", x)(x, weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6):
    return _pick("rms_norm", x)(x, weight, eps)


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None):
    return _pick("attention", q)(q, k, v, causal, dropout_p, scale)
