"""Data, tensor and pipeline layouts on 4 gloo ranks, one launch, each against plain torch AdamW
on the serial model fed the same global batches (losses averaged over DP; updated weights
gathered to serial names; gradient clipping active so cross-TP/PP grad norms are checked):

  * TP=2 x DP=2 (ZeRO-1 shards over the DP group of 2) and DP=4 (ZeRO-1 over 4): same losses
    (averaged over DP) and same updated weights as the serial reference, hence as each other;
  * TP=2 x PP=2 (tensor parallelism inside pipeline stages; RMSNorm, SwiGLU, GQA, untied head)
    with DeepSpeed's TP-sliced stage-to-stage transfers, and with sequence parallelism (which
    needs them off: prepare_ds_config) and learned positions, checkpointed after step 2: the
    DeepSpeed per-layer files consolidated offline and loaded at TP=1 PP=1 reproduce the step-3
    loss of the TP=2 x PP=2 run;
  * the TP=2 x PP=2 + SP run's DeepSpeed checkpoint after step 2 resumed elastically at PP=4
    (weights and Adam state read offline, re-split): step 3 gives the serial loss and updated weights;
  * PP=4 (DeepSpeed PipelineModule, 1F1B train_batch, ZeRO-1, uniform partitioning) with the
    embedding tied across the first and last stage and activation checkpointing every layer:
    matches serial, and the two middle stages never read the data iterator.
"""
import json

import pytest
import torch

from megagpt.model import GPT
from test_parallel_harness import (WTOL, assert_sd_close, make_batches, make_engine, reference_sd, serial_reference,
                                   spawn, tiny_cfg, train_pipeline)

pytestmark = pytest.mark.slow   # real multi-process runs; `-m "not slow"` skips them locally


def _worker(rank, world, tmp):
    from megagpt.parallel.groups import build_parallel_state
    from megagpt.parallel.topology import ParallelConfig

    tp_dp = build_parallel_state(ParallelConfig(tensor_parallel=2))
    assert tp_dp.dp_size == 2 and tp_dp.mpu.get_data_parallel_group_ranks() == [rank % 2, rank % 2 + 2]
    train_pipeline(tp_dp, "tiny-gpt2", steps=2, micro_batch=2, gas=1)
    dp4 = build_parallel_state(ParallelConfig())
    train_pipeline(dp4, "tiny-gpt2", steps=2, micro_batch=1, gas=1)
    tp_pp = build_parallel_state(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    train_pipeline(tp_pp, "tiny-modern", steps=2, micro_batch=2, gas=2)   # DeepSpeed's TP-sliced p2p
    tp_pp = build_parallel_state(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True))
    _, _, losses = train_pipeline(tp_pp, "tiny-modern", steps=3, micro_batch=2, gas=2, ckpt_dir=f"{tmp}/ds",
                                  pos_emb="learned")
    if rank == 0:
        json.dump({"losses": losses}, open(f"{tmp}/losses.json", "w"))
    pp4 = build_parallel_state(ParallelConfig(pipeline_parallel=4, partition_method="uniform",
                                              activation_checkpoint_interval=1))
    _, _, losses4 = train_pipeline(pp4, "tiny-gpt2", steps=2, micro_batch=1, gas=2, ckpt_dir=f"{tmp}/ds4")
    if rank == 0:
        json.dump({"losses": losses4}, open(f"{tmp}/losses4.json", "w"))
    _resume_tp_pp_run_at_pp4(pp4, f"{tmp}/ds", losses)


def _resume_tp_pp_run_at_pp4(pp4, ckpt_dir, losses):
    """The TP=2 x PP=2 + SP run's checkpoint after step 2 (ZeRO-1 partitions of 4 model-parallel
    ranks), resumed elastically at PP=4: step 3 gives the serial loss and updated weights."""
    from megagpt.checkpoint.deepspeed_files import read_client_state
    from megagpt.checkpoint.elastic import load_elastic
    from megagpt.parallel.layout import build_model, full_state_dict, train_step

    cfg = tiny_cfg("tiny-modern", pos_emb="learned")
    engine = make_engine(build_model(cfg, pp4, seed=0), pp4, micro_batch=2, gas=2)
    load_elastic(engine, ckpt_dir, "global_step2", read_client_state(f"{ckpt_dir}/global_step2")[0])
    batches = make_batches(cfg, 3, 4, seed=3)
    ids, labels = batches[2]
    loss = train_step(engine, iter(list(zip(ids.chunk(2), labels.chunk(2)))), pp4).item()
    assert abs(loss - losses[2]) < 2e-5, (loss, losses)
    _, ref_sd = serial_reference(cfg, reference_sd(cfg), batches, micro_splits=2)
    assert_sd_close(full_state_dict(engine), ref_sd, **WTOL)


def test_tp_dp_pp_layouts_match_serial_and_reshape(tmp_path):
    spawn(_worker, 4, str(tmp_path), tmp_path=tmp_path)

    from megagpt.checkpoint import open_checkpoint

    losses = json.load(open(tmp_path / "losses.json"))["losses"]
    assert sorted(p.name for p in (tmp_path / "ds" / "global_step2").glob("layer_*"))[:2] == [
        "layer_00-model_00-model_states.pt", "layer_00-model_01-model_states.pt"]
    src = open_checkpoint(tmp_path / "ds", tag="global_step2", tokenizer=False)
    full_sd, cfg = src.state_dict(), src.cfg
    model = GPT(cfg)
    model.load_state_dict(full_sd)
    ids, labels = make_batches(cfg, 3, 4, seed=3)[2]
    with torch.no_grad():
        resumed = model(ids, labels=labels).item()
    assert abs(resumed - losses[2]) < 2e-5, (resumed, losses)

    # PP=4 with the embedding tied across stages 0 and 3: consolidated, the head is the table
    losses4 = json.load(open(tmp_path / "losses4.json"))["losses"]
    src = open_checkpoint(tmp_path / "ds4", tag="global_step1", tokenizer=False)
    full_sd, cfg = src.state_dict(), src.cfg
    assert cfg.tie_embeddings and full_sd["lm_head.weight"] is full_sd["embed.tok.weight"]
    model = GPT(cfg)
    model.load_state_dict(full_sd)
    ids, labels = make_batches(cfg, 2, 2, seed=3)[1]
    with torch.no_grad():
        resumed = model(ids, labels=labels).item()
    assert abs(resumed - losses4[1]) < 2e-5, (resumed, losses4)
