"""megagpt/checkpoint: which tag is read, the order of the save protocol's last writes (with a real
DeepSpeed engine on one gloo rank), the one state-dict normalisation, and the tokenizer that travels
inside checkpoints."""
import os
import re
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint.state_dict import normalize_state_dict
from megagpt.checkpoint.tags import complete_tags, resolve_tag
from megagpt.errors import MegaGPTError
from megagpt.model import GPT, get_preset


def _tags(root, complete=(), incomplete=(), latest=None):
    for step, done in [(s, True) for s in complete] + [(s, False) for s in incomplete]:
        (root / f"global_step{step}").mkdir(parents=True)
        if done:
            (root / f"global_step{step}" / "complete").write_text("ok\n")
    if latest is not None:
        (root / "latest").write_text(f"global_step{latest}")
    return root


def test_newest_complete_tag_is_the_checkpoint(tmp_path):
    root = _tags(tmp_path / "run", complete=(2, 4), incomplete=(6,), latest=2)
    (root / "global_stepX").mkdir()
    assert complete_tags(root) == [(2, "global_step2"), (4, "global_step4")]
    # not 'latest' (one behind after a crash between the two writes), not the half-written 6
    assert resolve_tag(root) == "global_step4"
    assert resolve_tag(root, "global_step2") == "global_step2"
    with pytest.raises(MegaGPTError, match=r"global_step6: incomplete checkpoint .*newest complete tag is "
                                           r"global_step4"):
        resolve_tag(root, "global_step6")
    with pytest.raises(MegaGPTError, match=r"no checkpoint tag 'global_step9' \(found: global_step2, global_step4, "):
        resolve_tag(root, "global_step9")
    # a run killed during its first save: nothing whole to read
    with pytest.raises(MegaGPTError, match="no complete checkpoint"):
        resolve_tag(_tags(tmp_path / "first", incomplete=(2,)))
    with pytest.raises(MegaGPTError, match="no such checkpoint directory"):
        resolve_tag(tmp_path / "nope")


def test_directories_deepspeed_wrote_alone_follow_its_latest(tmp_path):
    """engine.save_checkpoint without megagpt's saver: no marker anywhere; DeepSpeed's 'latest' is
    written after its files, so it names the checkpoint (an explicit tag is taken as given)."""
    root = _tags(tmp_path, incomplete=(3, 5), latest=3)
    assert resolve_tag(root) == "global_step3" and resolve_tag(root, "global_step5") == "global_step5"
    (root / "latest").write_text("global_step7")
    with pytest.raises(MegaGPTError, match="latest: names tag 'global_step7', which does not exist"):
        resolve_tag(root)


def test_normalisation_strips_wrappers_restores_the_tied_name_and_checks_shapes():
    cfg = get_preset("tiny-gpt2")
    full = GPT(cfg).state_dict()
    tied = ("embed.tok.weight", "lm_head.weight")
    for wrapper in ("module.", "_orig_mod.module.", "gpt."):
        for kept in tied:   # a writer may list the tied table under either name
            saved = {wrapper + k: v.to(torch.bfloat16) for k, v in full.items() if k not in tied or k == kept}
            got = normalize_state_dict(saved, cfg, "ckpt")
            assert list(got) == list(full) and all(v.dtype == torch.float32 for v in got.values())
            assert got["embed.tok.weight"] is got["lm_head.weight"]   # one tensor, as in the model
            assert torch.equal(got["lm_head.weight"], full["embed.tok.weight"].to(torch.bfloat16).float())
    untied = get_preset("tiny-modern")
    assert not untied.tie_embeddings
    sd = GPT(untied).state_dict()
    with pytest.raises(MegaGPTError, match=r"ckpt: weights do not match .*missing \['lm_head.weight'\]"):
        normalize_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, untied, "ckpt")
    bad = {**full, "blocks.0.extra": torch.zeros(1), "ln_f.bias": torch.zeros(3)}
    del bad["blocks.0.ln1.bias"]
    with pytest.raises(MegaGPTError, match=r"missing \['blocks.0.ln1.bias'\], unexpected \['blocks.0.extra'\], "
                                           r"wrong shape \['ln_f.bias \(3,\) != \(64,\)'\]"):
        normalize_state_dict(bad, cfg, "ckpt")


def _save_worker(rank, world, tmp, sp_model):
    """A real ZeRO-1 engine saved twice through megagpt's protocol; the writer records each
    published file and what the tag held at that moment, and 'dies' at the second save's 'latest'."""
    import deepspeed

    import megagpt.checkpoint.engine as ckpt
    from megagpt.checkpoint import load_model
    from megagpt.parallel.layout import full_state_dict

    torch.manual_seed(0)
    cfg = get_preset("tiny-gpt2", n_layer=1, max_seq_len=16)
    model = GPT(cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config={"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 9,
                                              "zero_optimization": {"stage": 1}})
    save = os.path.join(tmp, "ckpt")
    writes, real = [], ckpt.write_bytes_atomic

    def recording(path, data, force=True):
        writes.append((os.path.basename(path), sorted(os.listdir(os.path.dirname(path)))))
        if writes[-1][0] == "latest" and len(writes) > 3:
            raise RuntimeError("killed between 'complete' and 'latest'")
        return real(path, data, force)

    ckpt.write_bytes_atomic = recording

    def step():
        x = torch.randint(0, cfg.vocab_size, (1, 16))
        engine.backward(engine(x, labels=x))
        engine.step()

    step()
    client = {"config": {"model": cfg.to_dict()}, "step": 2}
    ckpt.save(engine, save, 2, client, tokenizer=sp_model)
    (manifest, _), (name, files), (second, _) = writes
    assert (manifest, name, second) == ("manifest.json", "complete", "latest"), writes   # the marker, then the hint
    assert ckpt.verify_tag(os.path.join(save, "global_step2")) is None
    assert "tokenizer" in files and "rng_rank0.pt" in files and "mp_rank_00_model_states.pt" in files, files
    assert open(os.path.join(save, "latest")).read() == "global_step2"
    step()
    with pytest.raises(RuntimeError, match="killed between"):
        ckpt.save(engine, save, 4, {**client, "step": 4}, tokenizer=sp_model)
    assert open(os.path.join(save, "latest")).read() == "global_step2"   # one behind ...
    loaded, tok, meta = load_model(save)                                  # ... and not read
    assert meta["tag"] == "global_step4" and meta["step"] == 4 and tok.vocab_size == 1000
    assert meta["tokenizer_path"] == os.path.join(save, "global_step4", "tokenizer", "tokenizer.model")
    want = full_state_dict(engine)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert ckpt.load(engine, save, expect_model=cfg.to_dict())["_tag"] == "global_step4"   # resume agrees


def test_save_writes_complete_before_latest_and_readers_ignore_latest(tmp_path, sp_model):
    from test_parallel_harness import spawn

    spawn(_save_worker, 1, str(tmp_path), sp_model, tmp_path=tmp_path)


def test_consolidated_checkpoint_carries_its_tokenizer(tmp_path, sp_model):
    import json

    from megagpt.checkpoint import load_model
    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = GPT(get_preset("tiny-gpt2"))
    out = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg, tokenizer_path=sp_model, step=7)
    assert json.loads((out / "tokenizer" / "spec.json").read_text())["type"] == "sentencepiece"
    loaded, tok, meta = load_model(out)
    assert meta == {"format": "consolidated", "path": str(out), "tag": None, "step": 7, "run_config": None,
                    "tokenizer_path": str(out / "tokenizer" / "tokenizer.model")}
    assert tok.encode("hear me") == load_tokenizer(sp_model).encode("hear me")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    small = save_consolidated(tmp_path / "small", GPT(get_preset("tiny", vocab_size=300)).state_dict(),
                              get_preset("tiny", vocab_size=300))
    with pytest.raises(MegaGPTError, match="has 1000 ids but the model of .* has 300 .*: wrong tokenizer"):
        load_model(small, tokenizer=sp_model)
    # fewer ids than the model: it would sample ids the tokenizer cannot decode (IndexError in sentencepiece)
    legacy_tok = Path(__file__).parent / "fixtures" / "legacy_v0" / "tokenizer.model"   # 400 ids
    with pytest.raises(MegaGPTError, match=re.escape(f"tokenizer {legacy_tok} has 400 ids but the model of {out} has "
                                                     f"1000 (it can sample ids the tokenizer cannot decode)")):
        load_model(out, tokenizer=legacy_tok)
    with pytest.raises(MegaGPTError, match="--tag only applies to DeepSpeed checkpoints"):
        load_model(out, tag="global_step1")


def test_resume_refuses_a_deepspeed_only_dir_and_deletes_nothing(tmp_path):
    """A directory DeepSpeed wrote alone (``latest``, no completion marker anywhere) is not a
    megagpt run to resume: refused in one line, its tags left on disk (the crash clean-up of
    unmarked tags only applies to directories megagpt wrote)."""
    from megagpt.checkpoint import engine
    from megagpt.errors import MegaGPTError

    (tmp_path / "global_step3").mkdir()
    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / "latest").write_text("global_step3")
    with pytest.raises(MegaGPTError, match="without megagpt's completion markers.*nothing was deleted"):
        engine.load(None, str(tmp_path))
    assert (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").is_file()


def _unmarked_worker(rank, world, tmp):
    from megagpt.checkpoint import engine

    run, other = Path(tmp) / "run", Path(tmp) / "other"
    for root in (run, other):
        _tags(root, incomplete=(2, 3))
        (root / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (run / "global_step3.incomplete").mkdir()   # an earlier leftover: the name is taken
    assert engine.load(None, str(other), save_dir=str(run)) is None
    assert sorted(os.listdir(other)) == ["global_step2", "global_step3"]
    assert (other / "global_step3" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    assert engine.load(None, str(run), save_dir=str(run)) is None
    assert sorted(os.listdir(run)) == ["global_step2.incomplete", "global_step3.incomplete",
                                       "global_step3.incomplete1"]
    assert (run / "global_step3.incomplete1" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"


def test_resume_never_deletes_unmarked_tags(tmp_path, capfd):
    """Tags without the marker (a save that did not finish, or a whole one that lost it) are never
    deleted: in another --load dir left as they are, in this run's --save dir renamed aside under a
    free name; one line says which."""
    from test_parallel_harness import spawn

    spawn(_unmarked_worker, 1, str(tmp_path), tmp_path=tmp_path)
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("warning: ")]
    assert lines == [f"warning: {tmp_path / 'other'}: skipping global_step2, global_step3 (no 'complete' marker: a "
                     f"save that did not finish); left as they are",
                     f"warning: {tmp_path / 'run'}: no 'complete' marker in global_step2, global_step3 (a save that "
                     f"did not finish): not resumed from; renamed global_step2 -> global_step2.incomplete, "
                     f"global_step3 -> global_step3.incomplete1"], lines
