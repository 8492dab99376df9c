"""DeepSpeed checkpoints → consolidated → HF: real 2-rank gloo runs save ZeRO-0/2/3 checkpoints
(ZeRO-3 parameters really partitioned), and conversion gives back exactly the weights the engine
held, which transformers then runs to the same logits."""
import os
import shutil
import socket

import pytest
import torch

from megagpt.errors import MegaGPTError

STAGES = {0: "tiny-gpt2", 2: "tiny-modern", 3: "tiny-gpt2"}   # untied GQA (Llama); tied params partitioned


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, tok):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    from megagpt.model import GPT, get_preset

    deepspeed.init_distributed(dist_backend="gloo")
    for stage, preset in STAGES.items():
        torch.manual_seed(0)
        cfg = get_preset(preset)
        gpt = GPT(cfg)
        engine, *_ = deepspeed.initialize(model=gpt, optimizer=torch.optim.AdamW(gpt.parameters(), lr=1e-2), config={
            "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9})
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(x, labels=x))
        engine.step()   # weights now differ from init, and differ per optimizer partition
        save = f"{out}/zero{stage}"
        client = {"consumed_samples": 4, "step": 1, "rng": {}, "tokenizer": {"type": "sentencepiece", "path": tok},
                  "config": {"model": cfg.to_dict(), "data": {"seq_length": 16}, "train": {"lr": 1e-2}}}
        engine.save_checkpoint(save, tag="global_step1", client_state=client)
        params = list(gpt.parameters())
        if stage == 3:
            partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in params if p.ds_numel >= 2 * world)
            with deepspeed.zero.GatheredParameters(params):
                ref = {k: v.detach().clone() for k, v in gpt.state_dict().items()}
        else:
            partitioned, ref = None, {k: v.detach().clone() for k, v in gpt.state_dict().items()}
        if rank == 0:
            torch.save({"state": ref, "partitioned": partitioned}, f"{save}/reference.pt")
        torch.distributed.barrier()


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory, sp_model):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ds_ckpts")
    mp.spawn(_worker, args=(2, _free_port(), str(out), sp_model), nprocs=2)
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_zero_checkpoint_consolidates_exactly(stage, ds_checkpoints, tmp_path, sp_model):
    from megagpt.export.consolidated import load_consolidated
    from megagpt.export.deepspeed_ckpt import deepspeed_to_consolidated

    src = ds_checkpoints / f"zero{stage}"
    ref = torch.load(src / "reference.pt")
    if stage == 3:
        assert ref["partitioned"] is True
        assert not (src / "global_step1" / "mp_rank_00_model_states.pt").exists()   # ZeRO-3 layout
    out = deepspeed_to_consolidated(src, tmp_path / "cons")
    sd, meta = load_consolidated(out)
    assert set(sd) == set(ref["state"])                  # tied name restored where DeepSpeed kept one
    for k, v in ref["state"].items():
        assert torch.equal(sd[k], v), k
    assert meta["step"] == 1 and meta["megagpt"]["train"] == {"lr": 1e-2}
    assert meta["model"]["name"] == STAGES[stage]
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_to_hf_runs_the_same_model(stage, ds_checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megagpt.export.convert import convert
    from megagpt.model import GPT, get_preset

    hf_dir = convert(ds_checkpoints / f"zero{stage}", tmp_path / "hf", "hf", tag="global_step1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = GPT(get_preset(STAGES[stage])).eval()
    ours.load_state_dict(torch.load(ds_checkpoints / f"zero{stage}" / "reference.pt")["state"])
    x = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)("hear me speak")["input_ids"]


def test_bad_deepspeed_checkpoints_are_named(ds_checkpoints, tmp_path):
    from megagpt.export.convert import convert

    src = tmp_path / "ckpt"
    shutil.copytree(ds_checkpoints / "zero2", src)
    with pytest.raises(MegaGPTError, match="no checkpoint tag 'global_step9'"):
        convert(src, tmp_path / "a", "consolidated", tag="global_step9")
    # a tag the saver never marked complete (beside one it did) is half-written
    (src / "global_step1" / "complete").write_text("")
    shutil.copytree(src / "global_step1", src / "global_step2")
    (src / "global_step2" / "complete").unlink()
    with pytest.raises(MegaGPTError, match="global_step2: incomplete checkpoint"):
        convert(src, tmp_path / "b", "consolidated", tag="global_step2")
    # a DeepSpeed checkpoint without megagpt's client state
    states = src / "global_step1" / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=False)
    del sd["config"]
    torch.save(sd, states)
    with pytest.raises(MegaGPTError, match="client state has no config"):
        convert(src, tmp_path / "c", "hf", tag="global_step1")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_tied_and_wrapped_names_are_restored():
    """zero_to_fp32 may list a tied weight once, or under a wrapper prefix; GPT's names come back."""
    from megagpt.export.deepspeed_ckpt import _restore_names
    from megagpt.model import GPT, get_preset

    cfg = get_preset("tiny-gpt2")
    full = GPT(cfg).state_dict()
    only_head = {f"module.{k}": v for k, v in full.items() if k != "embed.tok.weight"}
    got = _restore_names(only_head, cfg, "ckpt")
    assert set(got) == set(full) and torch.equal(got["embed.tok.weight"], full["lm_head.weight"])
    with pytest.raises(MegaGPTError, match=r"ckpt: weights do not match .*missing \['blocks.0.ln1.bias'\]"):
        _restore_names({k: v for k, v in full.items() if k != "blocks.0.ln1.bias"}, cfg, "ckpt")
