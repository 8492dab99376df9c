"""Pretraining entry point.

    deepspeed [--num_gpus N] megagpt/train/pretrain.py --config configs/tiny_cpu.yaml \\
        --deepspeed_config ds_configs/zero2.json [--save DIR --load DIR --save-interval N --train-iters N]
    python -m megagpt.train.pretrain --config ... --deepspeed_config ...     # 1 process, for debugging
    mpirun -np N python megagpt/train/pretrain.py ...                         # ranks from OMPI_*/PMI_*

Model parallelism: the config's ``parallel:`` section or --tensor-model-parallel-size,
--pipeline-model-parallel-size, --sequence-parallel (docs/parallelism.md).

Flags override the YAML (Megatron names). Every config mistake is reported before any process
group starts; see megagpt/config.py for the schema.
"""
from __future__ import annotations

import argparse
import os
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
    "--tensor-model-parallel-size": ("parallel", "tensor_parallel", int),
    "--pipeline-model-parallel-size": ("parallel", "pipeline_parallel", int),
}
_HELP = {
    "--data-path": "shard prefix(es), or weight prefix pairs (data.data_path)",
    "--tokenizer": "tokenizer the shards were made with (data.tokenizer)",
    "--split": "train,valid,test proportions, e.g. 969,30,1 (data.split)",
    "--seq-length": "tokens per sample (data.seq_length; default model.max_seq_len)",
    "--micro-batch-size": "samples per rank per micro-batch (train.micro_batch_size)",
    "--gradient-accumulation-steps": "micro-batches per optimizer step (train.gradient_accumulation_steps)",
    "--global-batch-size": "must equal micro x accumulation x data-parallel size (train.global_batch_size)",
    "--train-iters": "optimizer steps in the run; sizes the sample stream and LR schedule (train.train_iters)",
    "--lr": "peak learning rate (train.lr)", "--min-lr": "final learning rate after decay (train.min_lr)",
    "--lr-warmup-iters": "linear warm-up steps (train.lr_warmup_iters)",
    "--lr-decay-style": "cosine, linear or constant (train.lr_decay_style)",
    "--lr-decay-iters": "steps to decay over; default train_iters (train.lr_decay_iters)",
    "--weight-decay": "AdamW weight decay on matmul weights (train.weight_decay)",
    "--clip-grad": "gradient-norm clipping threshold (train.clip_grad)",
    "--seed": "seed of weights, dropout and data order (train.seed)",
    "--log-interval": "log loss/throughput every N steps (train.log_interval)",
    "--eval-interval": "validate every N steps, 0 = never (train.eval_interval)",
    "--eval-iters": "validation micro-batches per evaluation (train.eval_iters)",
    "--save": "checkpoint directory (train.save)", "--load": "resume from the newest complete tag here (train.load)",
    "--save-interval": "save every N steps, 0 = only at the end / on stop (train.save_interval)",
    "--keep-last": "keep only the newest N checkpoints, 0 = all (train.keep_last)",
    "--exit-interval": "save and exit 0 when step %% N == 0 (train.exit_interval)",
    "--tensorboard-dir": "tensorboard event dir; default <save>/tensorboard (train.tensorboard_dir)",
    "--nan-policy": "skip or stop on a non-finite loss (train.nan_policy)",
    "--tensor-model-parallel-size": "tensor-parallel degree (parallel.tensor_parallel)",
    "--pipeline-model-parallel-size": "pipeline stages (parallel.pipeline_parallel)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="megagpt GPT pretraining on DeepSpeed")
    p.add_argument("--config", required=True, help="model + data + train YAML/JSON")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    p.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar (train.progress_bar=false)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism inside tensor-parallel groups (parallel.sequence_parallel)")
    for flag, (_, _, typ) in _FLAGS.items():
        p.add_argument(flag, type=typ, nargs="+" if flag == "--data-path" else None, default=None, help=_HELP[flag])
    a = p.parse_args(argv)
    overrides = {}
    for flag, (sec, key, _) in _FLAGS.items():
        val = getattr(a, flag.lstrip("-").replace("-", "_"))
        if val is not None:
            overrides[(sec, key)] = val
    if a.no_progress_bar:
        overrides[("train", "progress_bar")] = False
    if a.sequence_parallel:
        overrides[("parallel", "sequence_parallel")] = True
    if a.deepspeed_config:
        overrides[("train", "deepspeed_config")] = a.deepspeed_config
    return a, overrides


def param_groups(model, weight_decay: float):
    """AdamW groups: decay matmul weights only (not biases, norms or embedding tables).

    Names are the serial GPT's in every layout (TP, pipeline), so the rule does not depend on it."""
    from megagpt.parallel.layout import named_parameters_serial

    decay, no_decay = [], []
    for name, p in named_parameters_serial(model):
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


def run(cfg, ds_config) -> int:
    import deepspeed
    import torch

    from megagpt.data import build_gpt_datasets
    from megagpt.tokenizer import load_tokenizer
    from megagpt.train import checkpoint, distributed, loop
    from megagpt.train.metrics import Metrics, peak_flops
    from megagpt.train.schedule import build_scheduler

    from megagpt.parallel.groups import build_parallel_state
    from megagpt.parallel.layout import build_model, deepspeed_mpu, model_stats, prepare_ds_config

    rank, world, _ = distributed.init_distributed()
    device = distributed.device()
    t = cfg.train
    par = build_parallel_state(cfg.parallel_config())
    ds_config = prepare_ds_config(ds_config, par)
    dp_rank, dp_size, dp_group = par.dp_rank, par.dp_size, par.dp_group   # not the world
    tok = load_tokenizer(cfg.data.tokenizer)
    mcfg = cfg.model_config()

    model = build_model(mcfg, par, t.seed)   # the same initial weights at every layout
    n_params, flops_per_token = model_stats(mcfg, cfg.data.seq_length)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay), config=ds_config,
        mpu=deepspeed_mpu(par),
        lr_scheduler=lambda opt: build_scheduler(opt, t))

    gbs = t.micro_batch_size * t.gradient_accumulation_steps * dp_size
    n_valid = t.eval_iters * t.micro_batch_size * dp_size if t.eval_interval else 0
    train_ds = valid_ds = None
    if par.needs_data:  # middle pipeline stages never read data
        train_ds, valid_ds, _ = build_gpt_datasets(cfg.data_config(), (t.train_iters * gbs, n_valid, 0),
                                                   mcfg.vocab_size)

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
        if cfg.debug.dump_weights and par.tp_size == 1 and par.pp_size == 1:
            dump_weights(model, os.path.join(t.save, checkpoint.tag_for(st.step) + "_weights_at_save.pt"), rank)
        checkpoint.save(engine, t.save, st.step, client, dp_group, t.keep_last, kill_before_complete=kill)

    peak, peak_src = peak_flops()
    tb = t.tensorboard_dir or (os.path.join(t.save, "tensorboard") if t.save else None)
    metrics = Metrics(rank, tb, os.path.join(t.save, "train_log.jsonl") if t.save else None,
                      flops_per_token, gbs * cfg.data.seq_length, world, peak, peak_src,
                      t.train_iters, state.step, t.progress_bar)
    if rank == 0:
        metrics.print(f"model {mcfg.name}: {n_params:,} params | dp={dp_size} tp={par.tp_size} pp={par.pp_size}"
                      f"{' +sp' if par.sequence_parallel else ''} | zero stage "
                      f"{engine.zero_optimization_stage()} | global batch {gbs} x {cfg.data.seq_length} tokens | "
                      f"device {device}")
    try:
        reason = loop.train(cfg, engine, model, train_ds, valid_ds, state, metrics, dp_group, device, save_fn, par)
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
    from megagpt.cluster.launch import discover_dist_env

    discover_dist_env()  # under mpirun: RANK/WORLD_SIZE/... from OMPI_*/PMI_* (before anything reads them)
    from megagpt.config import load_config
    from megagpt.parallel.layout import check_zero_stage
    from megagpt.train.distributed import build_ds_config, dp_world_from_env

    try:
        cfg = load_config(a.config, overrides)
        pcfg = cfg.parallel_config()
        world = dp_world_from_env()
        try:
            dp = pcfg.data_parallel_size(world)
        except MegaGPTError as e:
            raise MegaGPTError(f"{cfg.source}: parallel: {e}") from None
        ds_config = build_ds_config(cfg.train.deepspeed_config, cfg.train, dp)
        try:
            check_zero_stage(ds_config, pcfg.pipeline_parallel)
        except MegaGPTError as e:
            raise MegaGPTError(f"{cfg.train.deepspeed_config}: {e}") from None
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
