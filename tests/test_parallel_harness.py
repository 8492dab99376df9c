"""Helpers for the parallelism tests (no tests here): spawn gloo ranks, a serial torch reference, DeepSpeed configs."""
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from megagpt.model import GPT, get_preset

LR, WD, CLIP = 1e-2, 0.1, 0.05      # clip small enough to be active: tests the TP grad-norm sums
# Adam's first steps move each weight by ~lr * g/|g|: with the default eps=1e-8 an element whose
# gradient is ~1e-9 (fp32 noise level of a summation-order change) flips sign freely. eps=1e-6
# keeps the update a smooth function of g, so layouts can be compared elementwise.
EPS = 1e-6
TOL = dict(atol=2e-5, rtol=1e-4)    # losses, logits, grads: fp32 with a different reduction order
WTOL = dict(atol=5e-5, rtol=1e-4)   # updated weights after a few steps: 0.5% of one lr=1e-2 step
SEQ = 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, err_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        from megagpt.train.distributed import release_deepspeed_shm_name

        release_deepspeed_shm_name()  # LOCAL_SIZE == world: DeepSpeed made /dev/shm buffers, as under its launcher
        fn(rank, world, *args)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn(fn, world, *args, tmp_path):
    """Run fn(rank, world, *args) on ``world`` gloo ranks; re-raise the first rank's traceback."""
    err_dir = str(tmp_path)
    # Import the heavy modules (DeepSpeed, torch._dynamo which torch.optim pulls in: ~20 s of CPU
    # per process) once here and fork, instead of once per spawned rank on 2 shared cores.
    import deepspeed.runtime.pipe.engine  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (its torch.compile imports inductor)
    import torch._dynamo  # noqa: F401
    import deepspeed.comm
    import torch.distributed as dist

    # a process group already set up in this (pytest) process must not leak into forked ranks
    method = "spawn" if dist.is_initialized() or deepspeed.comm.is_initialized() else "fork"
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, err_dir), nprocs=world, join=True,
                           start_method=method)
    except Exception as e:
        errs = sorted(f for f in os.listdir(err_dir) if f.endswith(".err"))
        msg = "\n".join(open(os.path.join(err_dir, f)).read() for f in errs[:1])
        raise AssertionError(f"rank failure:\n{msg}") from e


def tiny_cfg(preset="tiny", **kw):
    return get_preset(preset, max_seq_len=SEQ, **kw)


def make_batches(cfg, n, batch, seed=0):
    """n global batches of (input_ids, labels), (batch, SEQ) each."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (n, batch, SEQ + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks]


def reference_sd(cfg, seed=0):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in GPT(cfg).state_dict().items()}


def serial_reference(cfg, full_sd, batches, micro_splits=1):
    """Plain torch: serial GPT, AdamW, clip_grad_norm_; each global batch is one optimizer step
    (grads averaged over ``micro_splits`` equal micro-batches). Returns (losses, final state dict)."""
    model = GPT(cfg)
    model.load_state_dict(full_sd)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, eps=EPS)
    losses = []
    for ids, labels in batches:
        opt.zero_grad()
        total = 0.0
        for i, l in zip(ids.chunk(micro_splits), labels.chunk(micro_splits)):
            loss = model(i, labels=l) / micro_splits
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(micro_batch, gas, dp, stage=1):
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
            "train_batch_size": micro_batch * gas * dp, "zero_optimization": {"stage": stage},
            "gradient_clipping": CLIP, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False}


def make_engine(model, state, micro_batch, gas=1, stage=1):
    import deepspeed

    opt = torch.optim.AdamW([p for p in model.parameters()], lr=LR, weight_decay=WD, eps=EPS)
    from megagpt.parallel.layout import prepare_ds_config

    cfg = prepare_ds_config(ds_config(micro_batch, gas, state.dp_size, stage), state)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                      mpu=None if state.pp_size > 1 else state.mpu)
    return engine


def assert_sd_close(got, want, atol=1e-5, rtol=1e-4):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def train_pipeline(state, preset, steps, micro_batch, gas, ckpt_dir=None, **overrides):
    """Train ``steps`` at ``state``'s layout (any TP/PP/DP) and assert losses and gathered weights
    equal the serial reference; return (cfg, engine, losses)."""
    from megagpt.parallel.layout import build_model, full_state_dict, load_full_state_dict, train_step

    cfg = tiny_cfg(preset, **overrides)
    sd = reference_sd(cfg)
    global_batch = micro_batch * gas * state.dp_size
    batches = make_batches(cfg, steps, global_batch, seed=3)
    model = build_model(cfg, state, seed=0)
    load_full_state_dict(model, sd)
    from megagpt.parallel.layout import named_parameters_serial

    names = [n for n, _ in named_parameters_serial(model)]
    assert len(names) == len(set(names)) and set(names) <= set(sd), sorted(set(names) - set(sd))
    engine = make_engine(model, state, micro_batch=micro_batch, gas=gas)
    losses = []
    for step, (ids, labels) in enumerate(batches, start=1):
        # this DP rank's micro-batches, in order
        mine = [(i.chunk(state.dp_size)[state.dp_rank], l.chunk(state.dp_size)[state.dp_rank])
                for i, l in zip(ids.chunk(gas), labels.chunk(gas))]
        reads = []

        def data_iter():
            for mb in mine:
                reads.append(1)
                yield mb

        it = data_iter()
        losses.append(train_step(engine, it, state).item())
        if state.pp_size > 1 and not (state.is_first_stage or state.is_last_stage):
            assert not reads, "a middle pipeline stage read data"
        if ckpt_dir is not None and step == steps - 1:
            engine.save_checkpoint(ckpt_dir, tag=f"global_step{step}",
                                   client_state={"config": {"model": cfg.to_dict()}})
    # the reference: each global batch split into gas micro-batches of all DP ranks' samples
    ref_losses, ref_sd = serial_reference(cfg, sd, _per_step_order(batches, gas, state.dp_size), micro_splits=gas)
    # DeepSpeed reports the mean over this rank's micro-batches; average over DP for the global loss
    t = torch.tensor(losses)
    if state.dp_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, group=state.dp_group)
        t /= state.dp_size
    torch.testing.assert_close(t, torch.tensor(ref_losses), **TOL)
    assert_sd_close(full_state_dict(engine), ref_sd, **WTOL)
    return cfg, engine, losses


def _per_step_order(batches, gas, dp):
    """Global batches re-ordered so that chunk(gas) gives micro-batch k of every DP rank."""
    out = []
    for ids, labels in batches:
        ids_mb = [[m.chunk(dp)[d] for d in range(dp)] for m in ids.chunk(gas)]
        lab_mb = [[m.chunk(dp)[d] for d in range(dp)] for m in labels.chunk(gas)]
        out.append((torch.cat([torch.cat(x) for x in ids_mb]), torch.cat([torch.cat(x) for x in lab_mb])))
    return out
