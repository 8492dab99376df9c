"""megagpt: GPT pretraining on DeepSpeed. See README.md and docs/architecture.md."""
__version__ = "0.1.0"
