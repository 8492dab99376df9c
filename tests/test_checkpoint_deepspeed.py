"""DeepSpeed checkpoints → consolidated → HF: the real pretraining entry, 2 gloo ranks, saves ZeRO-0/2/3
checkpoints (ZeRO-3 parameters really partitioned); conversion gives back exactly the weights the engine
held (its debug weight dump), which transformers then runs to the same logits. Each tag carries its
tokenizer files, which readers prefer to the path the client state names."""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from megagpt.errors import MegaGPTError

REPO = Path(__file__).resolve().parents[1]

STAGES = {0: "tiny-gpt2", 2: "tiny-modern", 3: "tiny-gpt2"}   # untied GQA (Llama); tied params partitioned


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, tok, prefix):
    """Each rank runs the real pretraining entry once per ZeRO stage (2 steps, a checkpoint at step 2)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megagpt.train import pretrain

    for stage, preset in STAGES.items():
        cfg = {"model": {"preset": preset, "max_seq_len": 32},
               "data": {"data_path": [prefix], "tokenizer": tok, "seq_length": 32, "split": "98,2,0"},
               "train": {"micro_batch_size": 2, "train_iters": 2, "lr": 1e-2, "lr_warmup_iters": 0,
                         "save": f"{out}/zero{stage}", "save_interval": 2, "eval_interval": 0,
                         "log_interval": 100, "progress_bar": False},
               "debug": {"dump_weights": True}}   # rank 0 writes the gathered weights at each save
        path = f"{out}/zero{stage}.rank{rank}.json"
        with open(path, "w") as f:
            json.dump(cfg, f)
        assert pretrain.main(["--config", path, "--deepspeed_config", f"{REPO}/ds_configs/zero{stage}.json"]) == 0


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory, sp_model, shakespeare_prefix):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ds_ckpts")
    mp.spawn(_worker, args=(2, _free_port(), str(out), sp_model, shakespeare_prefix), nprocs=2)
    return out


def _reference(stage, root):
    return torch.load(root / f"zero{stage}" / "global_step2_weights_at_save.pt")


def _zero3_is_partitioned(tag_dir):
    """Module files hold only empty placeholders; each rank's optimizer holds a part of the fp32 weights."""
    module = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
    parts = [sum(t.numel() for t in torch.load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                               weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"])
             for r in (0, 1)]
    return all(t.numel() == 0 for t in module.values()), parts


@pytest.mark.parametrize("stage", list(STAGES))
def test_zero_checkpoint_consolidates_exactly(stage, ds_checkpoints, tmp_path, sp_model):
    from megagpt.checkpoint.consolidated import load_consolidated
    from megagpt.checkpoint.convert import convert

    src = ds_checkpoints / f"zero{stage}"
    ref = _reference(stage, ds_checkpoints)
    if stage == 3:
        empty_module, parts = _zero3_is_partitioned(src / "global_step2")
        n = sum(v.numel() for k, v in ref.items() if k != "lm_head.weight")   # tied: stored once
        assert empty_module and 0 < parts[0] < n and 0 < parts[1] < n and sum(parts) >= n, (parts, n)
    out = convert(src, tmp_path / "cons", "consolidated")
    sd, meta = load_consolidated(out)
    assert set(sd) == set(ref)                  # tied name restored where DeepSpeed kept one
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
    assert meta["step"] == 2 and meta["megagpt"]["train"]["lr"] == 1e-2
    assert meta["model"]["name"] == STAGES[stage]
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_to_hf_runs_the_same_model(stage, ds_checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megagpt.checkpoint.convert import convert
    from megagpt.model import GPT, get_preset

    hf_dir = convert(ds_checkpoints / f"zero{stage}", tmp_path / "hf", "hf", tag="global_step2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = GPT(get_preset(STAGES[stage], max_seq_len=32)).eval()
    ours.load_state_dict(_reference(stage, ds_checkpoints))
    x = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)("hear me speak")["input_ids"]


def test_tag_carries_its_tokenizer_files(ds_checkpoints, tmp_path, sp_model):
    """One layout (tokenizer/ + spec.json) in every tag; loaders use it even when the file the client
    state names is gone."""
    from megagpt.checkpoint import load_model

    src = tmp_path / "ckpt"
    shutil.copytree(ds_checkpoints / "zero2", src)
    tdir = src / "global_step2" / "tokenizer"
    assert (tdir / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()
    assert json.loads((tdir / "spec.json").read_text()) == {"type": "sentencepiece", "file": "tokenizer.model"}
    states = src / "global_step2" / "mp_rank_00_model_states.pt"
    client = torch.load(states, weights_only=False)
    assert client["tokenizer"]["path"] == sp_model   # provenance: the file training used
    client["tokenizer"]["path"] = str(tmp_path / "moved" / "tok.model")
    torch.save(client, states)
    model, tok, meta = load_model(src)
    assert meta["tokenizer_path"] == str(tdir / "tokenizer.model") and tok.vocab_size == 1000
    assert meta["tag"] == "global_step2" and meta["step"] == 2 and not model.training


def test_bad_deepspeed_checkpoints_are_named(ds_checkpoints, tmp_path):
    from megagpt.checkpoint.convert import convert

    src = tmp_path / "ckpt"
    shutil.copytree(ds_checkpoints / "zero2", src)
    with pytest.raises(MegaGPTError, match="no checkpoint tag 'global_step9'"):
        convert(src, tmp_path / "a", "consolidated", tag="global_step9")
    # a tag the saver never marked complete (beside one it did) is half-written
    shutil.copytree(src / "global_step2", src / "global_step3")
    (src / "global_step3" / "complete").unlink()
    with pytest.raises(MegaGPTError, match="global_step3: incomplete checkpoint"):
        convert(src, tmp_path / "b", "consolidated", tag="global_step3")
    (src / "latest").write_text("global_step3")   # 'latest' is a hint for DeepSpeed's tools, never the rule
    from megagpt.checkpoint.load import open_checkpoint

    assert open_checkpoint(src).tag == "global_step2"
    # a DeepSpeed checkpoint without megagpt's client state
    states = src / "global_step2" / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=False)
    del sd["config"]
    torch.save(sd, states)
    with pytest.raises(MegaGPTError, match="client state has no config"):
        convert(src, tmp_path / "c", "hf", tag="global_step2")
    assert not any((tmp_path / n).exists() for n in "abc")
