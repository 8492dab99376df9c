"""The GPT decoder: config, presets, model and generation. See gpt.py for parameter names."""
from .attention import KVCache  # noqa: F401
from .config import ModelConfig  # noqa: F401
from .generate import generate  # noqa: F401
from .gpt import GPT  # noqa: F401
from .presets import PRESETS, get_preset  # noqa: F401
