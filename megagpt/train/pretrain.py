"""Pretraining entry point.

    deepspeed [--num_gpus N] megagpt/train/pretrain.py --config configs/tiny_cpu.yaml \\
        --deepspeed_config ds_configs/zero2.json [--save DIR --load DIR --save-interval N --train-iters N]
    python -m megagpt.train.pretrain --config ... --deepspeed_config ...     # 1 process, for debugging

Flags override the YAML (Megatron names). Every config mistake is reported before any process
group starts; see megagpt/config.py for the schema.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

if __package__ in (None, ""):  # run as a file by the deepspeed launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402

# flag -> (section, key, type)
_FLAGS = {
    "--data-path": ("data", "data_path", str), "--tokenizer": ("data", "tokenizer", str),
    "--split": ("data", "split", str), "--seq-length": ("data", "seq_length", int),
    "--micro-batch-size": ("train", "micro_batch_size", int),
    "--gradient-accumulation-steps": ("train", "gradient_accumulation_steps", int),
    "--global-batch-size": ("train", "global_batch_size", int), "--train-iters": ("train", "train_iters", int),
    "--lr": ("train", "lr", float), "--min-lr": ("train", "min_lr", float),
    "--lr-warmup-iters": ("train", "lr_warmup_iters", int), "--lr-decay-style": ("train", "lr_decay_style", str),
    "--lr-decay-iters": ("train", "lr_decay_iters", int), "--weight-decay": ("train", "weight_decay", float),
    "--clip-grad": ("train", "clip_grad", float), "--seed": ("train", "seed", int),
    "--log-interval": ("train", "log_interval", int), "--eval-interval": ("train", "eval_interval", int),
    "--eval-iters": ("train", "eval_iters", int), "--save": ("train", "save", str), "--load": ("train", "load", str),
    "--save-interval": ("train", "save_interval", int), "--keep-last": ("train", "keep_last", int),
    "--exit-interval": ("train", "exit_interval", int),
    "--tensorboard-dir": ("train", "tensorboard_dir", str), "--nan-policy": ("train", "nan_policy", str),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="megagpt GPT pretraining on DeepSpeed")
    p.add_argument("--config", required=True, help="model + data + train YAML/JSON")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    p.add_argument("--no-progress-bar", action="store_true")
    for flag, (_, _, typ) in _FLAGS.items():
        p.add_argument(flag, type=typ, nargs="+" if flag == "--data-path" else None, default=None)
    a = p.parse_args(argv)
    overrides = {}
    for flag, (sec, key, _) in _FLAGS.items():
        val = getattr(a, flag.lstrip("-").replace("-", "_"))
        if val is not None:
            overrides[(sec, key)] = val
    if a.no_progress_bar:
        overrides[("train", "progress_bar")] = False
    if a.deepspeed_config:
        overrides[("train", "deepspeed_config")] = a.deepspeed_config
    return a, overrides


def param_groups(model, weight_decay: float):
    """AdamW groups: decay matmul weights only (not biases, norms or embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("embed.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def dump_weights(model, path, rank) -> None:
    """Test hook: the full fp32 weights as the model holds them now (gathered under ZeRO-3)."""
    import deepspeed
    import torch
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            torch.save({k: v.detach().float().clone() for k, v in model.state_dict().items()}, path)


def seed_all(seed: int) -> None:
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def run(cfg, ds_config) -> int:
    import deepspeed
    import torch

    from megagpt.data import build_gpt_datasets
    from megagpt.model import GPT
    from megagpt.tokenizer import load_tokenizer
    from megagpt.train import checkpoint, distributed, loop
    from megagpt.train.metrics import Metrics, peak_flops
    from megagpt.train.schedule import build_scheduler

    rank, world, dp_group = distributed.init_distributed()
    device = distributed.device()
    dp_rank, dp_size = torch.distributed.get_rank(dp_group), torch.distributed.get_world_size(dp_group)
    t = cfg.train
    tok = load_tokenizer(cfg.data.tokenizer)
    mcfg = cfg.model_config()

    seed_all(t.seed)  # identical initial weights on every rank
    model = GPT(mcfg)
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.data.seq_length)  # before ZeRO-3 shards
    seed_all(t.seed + 1000 * dp_rank)  # per-rank dropout streams
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, t))

    gbs = t.micro_batch_size * t.gradient_accumulation_steps * dp_size
    n_valid = t.eval_iters * t.micro_batch_size * dp_size if t.eval_interval else 0
    train_ds, valid_ds, _ = build_gpt_datasets(cfg.data_config(), (t.train_iters * gbs, n_valid, 0), mcfg.vocab_size)

    state = loop.TrainState()
    if t.load:
        client = checkpoint.load(engine, t.load, expect_model=cfg.model)
        if client is not None:
            state = loop.TrainState(client["step"], client["consumed_samples"], client.get("skipped_steps", 0))
            if rank == 0:
                print(f"resumed from {t.load}/{client['_tag']} at step {state.step}", flush=True)

    def save_fn(st, kill=False):
        client = {"step": st.step, "consumed_samples": st.consumed_samples, "skipped_steps": st.skipped_steps,
                  "rng": checkpoint.rng_state(), "config": cfg.to_dict(), "tokenizer": tok.spec()}
        if not t.save:
            return
        if cfg.debug.dump_weights:
            dump_weights(model, os.path.join(t.save, checkpoint.tag_for(st.step) + "_weights_at_save.pt"), rank)
        checkpoint.save(engine, t.save, st.step, client, dp_group, t.keep_last, kill_before_complete=kill)

    peak, peak_src = peak_flops()
    tb = t.tensorboard_dir or (os.path.join(t.save, "tensorboard") if t.save else None)
    metrics = Metrics(rank, tb, os.path.join(t.save, "train_log.jsonl") if t.save else None,
                      flops_per_token, gbs * cfg.data.seq_length, dp_size, peak, peak_src,
                      t.train_iters, state.step, t.progress_bar)
    if rank == 0:
        metrics.print(f"model {mcfg.name}: {n_params:,} params | dp={dp_size} | zero stage "
                      f"{engine.zero_optimization_stage()} | global batch {gbs} x {cfg.data.seq_length} tokens | "
                      f"device {device}")
    try:
        reason = loop.train(cfg, engine, model, train_ds, valid_ds, state, metrics, dp_group, device, save_fn)
    except loop.NonFiniteLoss as e:
        metrics.close()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    metrics.close()
    torch.distributed.barrier()
    return 0 if reason in ("done", "preempted", "exit_interval") else 1


@cli_main
def main(argv=None) -> int:
    a, overrides = parse_args(argv)
    from megagpt.config import load_config
    from megagpt.train.distributed import build_ds_config, dp_world_from_env

    try:
        cfg = load_config(a.config, overrides)
        ds_config = build_ds_config(cfg.train.deepspeed_config, cfg.train, dp_world_from_env())
    except MegaGPTError:
        if int(os.environ.get("RANK", "0")) != 0:  # every rank finds the same mistake: say it once
            sys.exit(2)
        raise
    return run(cfg, ds_config)


if __name__ == "__main__":
    code = main()
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    sys.exit(code)
