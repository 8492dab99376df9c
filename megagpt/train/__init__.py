"""Pretraining on DeepSpeed: ``pretrain`` (entry) composes ``distributed`` (process group, ds
config), ``schedule`` (LR), ``loop`` (steps, NaN policy, eval, SIGTERM), ``checkpoint``
(crash-safe tags, exact resume) and ``metrics`` (log line, tensorboard, MFU)."""
