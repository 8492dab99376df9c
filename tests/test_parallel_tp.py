"""Tensor (and sequence) parallelism on 2 gloo ranks against independent serial references.

One launch, several proofs (each rank asserts; a failure on any rank fails the test):
  * vocab-parallel cross-entropy == torch's full-softmax F.cross_entropy (values, grads; padded
    vocab columns and ignore_index included);
  * a fresh TP=2 GPT's initial weights, gathered, are bit-identical to the serial GPT's (same seed);
  * TP=2 forward logits/loss and gathered grads == serial GPT, for post-LN GPT-1, pre-LN GPT-2
    and Llama-style (RMSNorm, SwiGLU, RoPE, GQA, untied) tiny models, with and without sequence
    parallelism;
  * a DeepSpeed ZeRO-1 engine (mpu=state.mpu) trained 3 steps at TP=2 (sequence parallel off and
    on) gives the same losses and the same updated (gathered) weights as plain torch AdamW on the
    serial model, gradient clipping active (so the TP grad-norm is right); so do ZeRO-2 and
    ZeRO-3 (2 steps; ZeRO-3 weights gathered with GatheredParameters);
  * checkpoint reshaping: the TP=2 engine's DeepSpeed checkpoint after step 2, consolidated
    offline (library and tools/convert_checkpoint.py) into serial names and loaded at TP=1, gives
    the TP=2 run's step-3 loss; the live engine consolidated after step 2 and re-split into a
    TP=2 + sequence-parallel model gives it too; with the Adam moments and step gathered too and
    re-split into TP=1 x DP=2 (ZeRO-1), step 3 reproduces the serial loss *and* updated weights;
  * TP=2 forward_hidden and KV-cache generation (greedy and seeded sampling) == serial;
  * the RNG tracker: per-TP-rank draws differ across TP ranks, default draws match, and the
    activation checkpoint replays both in the recomputation (same output and grads), also for a
    whole TP GPT with every dropout on (SP off and on);
  * a same-layout resume through DeepSpeed's own checkpoint (mpu-named files, optimizer state)
    reproduces the last step's loss and update.
"""
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.model import GPT
from test_parallel_harness import (TOL, WTOL, assert_sd_close, make_batches, make_engine, reference_sd, serial_reference,
                                   spawn, tiny_cfg)

pytestmark = pytest.mark.slow   # real multi-process runs; `-m "not slow"` skips them locally



def _check_cross_entropy(state):
    from megagpt.tp.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(5)
    vocab, padded, n = 250, 256, 24
    full = torch.randn(n, padded, generator=g) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    ref_logits = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits[:, :vocab], labels, ignore_index=-100)
    ref.backward()
    per = padded // state.tp_size
    local = full[:, state.tp_rank * per:(state.tp_rank + 1) * per].clone().requires_grad_(True)
    got = vocab_parallel_cross_entropy(local, labels, state.tp_group, state.tp_rank * per, vocab)
    got.backward()
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(local.grad, ref_logits.grad[:, state.tp_rank * per:(state.tp_rank + 1) * per], **TOL)


def _check_forward_backward(state):
    """TP = serial in loss, logits and every gradient; also with the loss computed 7 tokens at a
    time (train.loss_chunk_tokens: chunked vocab-parallel cross-entropy, logits recomputed)."""
    for preset, chunk in (("tiny", 0), ("tiny-gpt2", 0), ("tiny-modern", 0), ("tiny-gpt2", 7), ("tiny-modern", 7)):
        cfg = tiny_cfg(preset)
        sd = reference_sd(cfg)
        ids, labels = make_batches(cfg, 1, 2, seed=1)[0]
        if chunk:   # ignored positions too: the chunks' sums must be divided by the valid count
            labels = labels.clone()
            labels[0, :3] = -100
        ser = GPT(cfg)
        ser.load_state_dict(sd)
        ref_loss = ser(ids, labels=labels)
        ref_loss.backward()
        tp = GPT(cfg, state.tp)
        tp.load_full_state_dict(sd)
        tp.loss_chunk_tokens = chunk
        loss = tp(ids, labels=labels)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(tp(ids), ser(ids), **TOL)
        with torch.no_grad():
            for p in tp.parameters():
                p.copy_(p.grad)
        grads = tp.full_state_dict()
        for name, p in ser.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, **TOL, msg=lambda m: f"{preset} grad {name}: {m}")


def _check_generation_and_hidden(state):
    """At TP=2 (and with sequence parallelism for full-sequence forwards) the one GPT gives the
    serial model's final hidden states, and KV-cache generation — greedy and sampled with a
    seeded generator — the serial model's tokens; the cache holds only this rank's heads."""
    from megagpt.model import generate

    for preset in ("tiny", "tiny-gpt2", "tiny-modern"):
        cfg = tiny_cfg(preset)
        sd = reference_sd(cfg)
        ser = GPT(cfg).eval()
        ser.load_state_dict(sd)
        tp = GPT(cfg, state.tp).eval()
        tp.load_full_state_dict(sd)
        ids = make_batches(cfg, 1, 2, seed=6)[0][0][:, :12]
        with torch.no_grad():
            torch.testing.assert_close(tp.forward_hidden(ids), ser.forward_hidden(ids), **TOL)
        if state.sequence_parallel:
            continue        # one new token cannot be split along the sequence: refused, tested below
        for temperature in (0.0, 0.9):
            want = generate(ser, ids, 8, temperature=temperature, top_k=20, generator=torch.Generator().manual_seed(1))
            got = generate(tp, ids, 8, temperature=temperature, top_k=20, generator=torch.Generator().manual_seed(1))
            assert torch.equal(got, want), (preset, temperature, got, want)
        cache = tp.new_kv_cache()
        tp(ids, kv_cache=cache)
        assert cache.layers[0][0].shape[1] == cfg.num_kv_heads // state.tp_size
    if state.sequence_parallel:
        import pytest

        from megagpt.errors import MegaGPTError

        with pytest.raises(MegaGPTError, match="without sequence parallelism for generation"):
            tp(ids[:, :1], kv_cache=tp.new_kv_cache())


def _check_rng(state):
    from megagpt.tp.random import checkpoint

    state.rng.seed_default()
    with state.rng.fork():
        split = torch.rand(8)
    replicated = torch.rand(8)
    both = [torch.empty(16) for _ in range(2)]
    torch.distributed.all_gather(both, torch.cat([split, replicated]), group=state.tp_group)
    assert not torch.equal(both[0][:8], both[1][:8]), "tracker draws must differ across TP ranks"
    assert torch.equal(both[0][8:], both[1][8:]), "default draws must match across TP ranks"

    def f(x):
        with state.rng.fork():
            x = F.dropout(x, 0.5, True)
        return F.dropout(x, 0.5, True).sin()

    x = torch.randn(4, 16, requires_grad=True)
    before = (torch.get_rng_state(), state.rng.get_state())
    ref = f(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad, None
    torch.set_rng_state(before[0])
    state.rng.set_state(before[1])
    out = checkpoint(state.rng, f, x)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_grad)


def _check_init(state):
    """Initial weights do not depend on the layout: a fresh TP GPT gathered is bit-identical to
    the serial GPT built from the same seed, for every family (GQA and untied heads included)."""
    for preset in ("tiny", "tiny-gpt2", "tiny-modern"):
        cfg = tiny_cfg(preset)
        torch.manual_seed(11)
        full = GPT(cfg, state.tp).full_state_dict()
        torch.manual_seed(11)
        ref = GPT(cfg).state_dict()
        assert full.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(full[k], v), (preset, k)


def _check_activation_checkpointing(state):
    """TP GPT with dropout everywhere: recomputation in backward replays both generators, so
    activation checkpointing changes neither the loss nor any gradient."""
    cfg = tiny_cfg("tiny-gpt2", embd_dropout=0.2, resid_dropout=0.2, attn_dropout=0.2)
    sd = reference_sd(cfg)
    ids, labels = make_batches(cfg, 1, 2, seed=4)[0]
    runs, tracker_state = [], state.rng.get_state()
    for ckpt in (False, True):
        cfg.activation_checkpointing = ckpt
        model = GPT(cfg, state.tp)
        model.load_full_state_dict(sd)
        torch.manual_seed(99)                 # same default and tracker states for both runs
        state.rng.set_state(tracker_state)
        loss = model(ids, labels=labels)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def _train(state, preset, steps, ckpt_dir=None, resplit_state=None, zero_stage=1):
    from megagpt.parallel.groups import build_parallel_state
    from megagpt.parallel.topology import ParallelConfig
    from megagpt.checkpoint.deepspeed_files import read_client_state
    from megagpt.checkpoint.elastic import load_elastic
    from megagpt.checkpoint import open_checkpoint
    from megagpt.parallel.layout import full_state_dict, train_step

    cfg = tiny_cfg(preset)
    sd = reference_sd(cfg)
    batches = make_batches(cfg, steps, 4, seed=2)
    model = GPT(cfg, state.tp)
    model.load_full_state_dict(sd)
    engine = make_engine(model, state, micro_batch=4, stage=zero_stage)
    losses = []
    for step, batch in enumerate(batches, start=1):
        losses.append(train_step(engine, iter([batch]), state).item())
        if ckpt_dir is not None and step == steps - 1:
            engine.save_checkpoint(ckpt_dir, tag=f"global_step{step}",
                                   client_state={"config": {"model": cfg.to_dict()}})
    ref_losses, ref_sd = serial_reference(cfg, sd, batches)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
    assert_sd_close(full_state_dict(engine), ref_sd, **WTOL)
    if ckpt_dir is not None:   # the live engine gathered into the consolidated format (rank 0 writes)
        from megagpt.checkpoint.consolidated import load_consolidated, save_consolidated_from_engine

        out, full = save_consolidated_from_engine(engine, f"{ckpt_dir}-live", cfg, step=steps), full_state_dict(engine)
        if dist.get_rank() == 0:
            live, meta = load_consolidated(out)
            assert meta["step"] == steps and all(torch.equal(v, live[k]) for k, v in full.items())
    if resplit_state is not None:   # the DeepSpeed checkpoint re-split into another layout
        resumed = GPT(cfg, resplit_state.tp)
        resumed.load_full_state_dict(open_checkpoint(ckpt_dir, f"global_step{steps - 1}", tokenizer=False).state_dict())
        with torch.no_grad():
            loss = resumed(*batches[-1][:1], labels=batches[-1][1]).item()
        assert abs(loss - losses[-1]) < 2e-5, (loss, losses)
        # same-layout resume through DeepSpeed's own checkpoint (mp_rank files via the mpu):
        # optimizer state included, so the last step's loss *and* update are reproduced
        again = GPT(cfg, state.tp)
        engine2 = make_engine(again, state, micro_batch=4, stage=zero_stage)
        engine2.load_checkpoint(ckpt_dir, tag=f"global_step{steps - 1}")
        assert abs(train_step(engine2, iter([batches[-1]]), state).item() - losses[-1]) < 2e-5
        assert_sd_close(full_state_dict(engine2), ref_sd, **WTOL)
        # elastic resume TP=2 DP=1 -> TP=1 DP=2 (ZeRO-1 over 2): weights *and* Adam moments/step
        # read offline and re-split, so the last step continues the serial trajectory exactly
        dp2 = build_parallel_state(ParallelConfig())
        engine3 = make_engine(GPT(cfg), dp2, micro_batch=2, stage=zero_stage)
        tag = f"global_step{steps - 1}"
        load_elastic(engine3, ckpt_dir, tag, read_client_state(f"{ckpt_dir}/{tag}")[0])
        ids, labels = batches[-1]
        mine = (ids.chunk(2)[dp2.dp_rank], labels.chunk(2)[dp2.dp_rank])
        loss = train_step(engine3, iter([mine]), dp2).reshape(1)
        dist.all_reduce(loss)
        assert abs(loss.item() / 2 - losses[-1]) < 2e-5
        assert_sd_close(full_state_dict(engine3), ref_sd, **WTOL)
    return cfg, batches, losses


def _worker(rank, world, tmp):
    from megagpt.parallel.groups import build_parallel_state
    from megagpt.parallel.topology import ParallelConfig

    tp = build_parallel_state(ParallelConfig(tensor_parallel=2))
    sp = build_parallel_state(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    _check_rng(tp)
    _check_cross_entropy(tp)
    _check_init(tp)
    _check_activation_checkpointing(tp)
    _check_activation_checkpointing(sp)
    _check_forward_backward(tp)
    _check_forward_backward(sp)
    _check_generation_and_hidden(tp)
    _check_generation_and_hidden(sp)
    cfg, batches, losses = _train(tp, "tiny-gpt2", 3, ckpt_dir=f"{tmp}/ds", resplit_state=sp)
    _train(sp, "tiny-modern", 3)
    _train(tp, "tiny", 2, zero_stage=2)
    _train(tp, "tiny", 2, zero_stage=3)
    if rank == 0:
        json.dump({"losses": losses}, open(f"{tmp}/losses.json", "w"))


def test_tensor_and_sequence_parallel_match_serial(tmp_path):
    spawn(_worker, 2, str(tmp_path), tmp_path=tmp_path)

    # Checkpoint reshaping TP=2 -> TP=1: consolidate the DeepSpeed files offline, resume serially.
    from megagpt.checkpoint.consolidated import load_consolidated, save_consolidated
    from megagpt.checkpoint import open_checkpoint

    losses = json.load(open(tmp_path / "losses.json"))["losses"]
    src = open_checkpoint(tmp_path / "ds", tag="global_step2", tokenizer=False)
    full_sd, cfg = src.state_dict(), src.cfg
    save_consolidated(tmp_path / "consolidated", full_sd, cfg, step=2)
    sd, meta = load_consolidated(tmp_path / "consolidated")
    assert meta["step"] == 2 and meta["model"] == cfg.to_dict()
    model = GPT(cfg)
    model.load_state_dict(sd)
    ids, labels = make_batches(cfg, 3, 4, seed=2)[2]
    with torch.no_grad():
        resumed = model(ids, labels=labels).item()
    assert abs(resumed - losses[2]) < 2e-5, (resumed, losses)

    # the CLI does the same, and refuses a directory that is not a DeepSpeed checkpoint
    import importlib.util
    from pathlib import Path

    import pytest

    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main

    main(["--input", str(tmp_path / "ds"), "--output", str(tmp_path / "cli"), "--to", "consolidated",
          "--tag", "global_step2", "--quiet"])
    cli_sd, _ = load_consolidated(tmp_path / "cli")
    assert all(torch.equal(cli_sd[k], sd[k]) for k in sd)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "cli"), "--output", str(tmp_path / "x"), "--to", "consolidated"])
    assert e.value.code == 2
