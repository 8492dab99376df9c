"""generate(): KV cache equivalence, greedy decoding, top-k/top-p support, eos, input handling; the
tools/generate.py CLI on a consolidated checkpoint."""
import pytest
import torch

from megagpt.errors import MegaGPTError
from megagpt.model import GPT, get_preset
from megagpt.model.generate import filter_logits, generate


def _model(name, **overrides):
    torch.manual_seed(0)
    return GPT(get_preset(name, **overrides)).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-modern"])  # learned positions and rope
def test_kv_cache_generation_equals_full_recompute(name):
    model = _model(name)
    prompt = torch.randint(0, 1000, (3, 5))
    greedy = [generate(model, prompt, 20, temperature=0, use_kv_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(model, prompt, 20, temperature=1.0, top_k=50, use_kv_cache=c,
                        generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert sampled[0].shape == (3, 25) and torch.equal(sampled[0][:, :5], prompt)
    assert not torch.equal(sampled[0], greedy[0])  # sampling really samples


def test_greedy_picks_the_argmax_of_the_model():
    model = _model("tiny-gpt2")
    prompt = [5, 17, 256, 3]
    out = generate(model, prompt, 3, temperature=0)
    assert out.shape == (7,) and out[:4].tolist() == prompt
    seq = torch.tensor(prompt)
    for _ in range(3):
        seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    assert torch.equal(out, seq)


def test_top_k_restricts_samples_to_the_k_most_likely():
    model = _model("tiny", n_layer=1)
    prompt = torch.tensor([[1, 2, 3]]).repeat(400, 1)
    with torch.no_grad():
        top3 = set(model(prompt[:1])[0, -1].topk(3).indices.tolist())
    out = generate(model, prompt, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(out[:, -1].tolist()) == top3  # all three seen, nothing else


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, False, True, False]
    assert keep(0.8) == [True, False, True, False]
    assert keep(0.81) == [True, False, True, True]
    assert keep(1.0) == [True, True, True, True]
    both = filter_logits(logits, top_k=1, top_p=0.9)
    assert torch.isfinite(both)[0].tolist() == [True, False, False, False]


def test_top_p_generation_samples_only_from_the_nucleus():
    model = _model("tiny", n_layer=1)
    prompt = torch.tensor([[4, 9]]).repeat(400, 1)
    with torch.no_grad():
        probs = model(prompt[:1])[0, -1].div(5.0).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    n_nucleus = int((sorted_p.cumsum(0) - sorted_p < 0.05).sum())
    out = generate(model, prompt, 1, temperature=5.0, top_p=0.05, generator=torch.Generator().manual_seed(0))
    seen = set(out[:, -1].tolist())
    assert seen <= set(order[:n_nucleus].tolist()) and len(seen) > 1


def test_eos_stops_rows_and_pads_finished_ones():
    model = _model("tiny-modern")
    prompt = torch.randint(0, 1000, (2, 4))
    free = generate(model, prompt, 12, temperature=0)
    eos = int(free[0, 6])  # the token row 0 emits third
    out = generate(model, prompt, 12, temperature=0, eos_id=eos)
    first = (free[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert torch.all(out[0, first:] == eos)
    if (free[1, 4:] == eos).any():  # the batch ends once every row has finished
        assert out.shape[1] <= free.shape[1]
    else:
        assert out.shape == free.shape and torch.equal(out[1], free[1])


def test_batched_list_prompts_and_training_mode_is_restored():
    model = _model("tiny")
    model.train()
    out = generate(model, [[1, 2, 3], [4, 5, 6]], 2, temperature=0)
    assert out.shape == (2, 5) and model.training
    assert torch.equal(out[1], generate(model, [4, 5, 6], 2, temperature=0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[[1, 2], [3]], max_new_tokens=1), "equal length"),
    (dict(prompt_ids=[1] * 60, max_new_tokens=5), "exceeds max_seq_len=64"),
    (dict(prompt_ids=[1], max_new_tokens=1, temperature=-1.0), "temperature"),
    (dict(prompt_ids=[1], max_new_tokens=1, top_p=0.0), "top_p"),
    (dict(prompt_ids=[1], max_new_tokens=1, top_k=0), "top_k"),
])
def test_bad_generation_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(MegaGPTError, match=match):
        generate(_model("tiny"), **kwargs)


def test_generate_cli_reads_a_consolidated_checkpoint_with_its_tokenizer(tmp_path, sp_model):
    """tools/generate.py samples from any format load_model reads (here: consolidated, tokenizer
    bundled); greedy output is the library's greedy continuation, decoded; mistakes are one line."""
    import subprocess
    import sys
    from pathlib import Path

    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.tokenizer import load_tokenizer

    model = _model("tiny-gpt2")
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg, tokenizer_path=sp_model)
    tool = Path(__file__).resolve().parents[1] / "tools" / "generate.py"
    run = lambda *a: subprocess.run([sys.executable, str(tool), str(cons), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    r = run("--prompt-ids", "2,17,256", "--temperature", "0", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(sp_model)
    want = generate(model, [2, 17, 256], 6, temperature=0, eos_id=tok.eos_id).tolist()
    assert r.stdout == f"=== [cons] prompt 1: [2, 17, 256]\n{tok.decode(want)}\n"
    for args, msg in ((["--prompt-ids", "2,x"], "expected comma-separated token ids"),
                      (["--prompt-ids", "2,5000"], "token ids must be in 0..999"),
                      (["--tag", "global_step1", "--prompt", "a"], "--tag only applies to DeepSpeed checkpoints")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr


def test_generate_cli_refuses_zero_new_tokens_naming_the_flag(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "tools" / "generate.py"), str(tmp_path), "--prompt", "x",
                        "--max-new-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --max-new-tokens 0: must be >= 1"], r.stderr


def _cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "generate.py"
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_generate_cli_greedy_uses_the_checkpoints_weights(tmp_path, sp_model):
    """Greedy CLI output == in-process greedy generation from load_model(checkpoint). The saved
    weights are perturbed away from any seeded init, and the test checks that a freshly built model
    would continue differently, so a CLI that never loaded the weights cannot pass."""
    from megagpt.checkpoint.consolidated import save_consolidated
    from megagpt.checkpoint.load import load_model

    model = _model("tiny-gpt2")
    g = torch.Generator().manual_seed(123)
    sd = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    cons = save_consolidated(tmp_path / "cons", sd, model.cfg, tokenizer_path=sp_model)
    loaded, tok, _ = load_model(cons)
    prompt = [2, 17, 256, 40]
    want = generate(loaded, prompt, 12, temperature=0, eos_id=tok.eos_id).tolist()
    fresh = [generate(m, prompt, 12, temperature=0, eos_id=tok.eos_id).tolist()
             for m in (model, GPT(loaded.cfg).eval())]
    assert want not in fresh and len(set(want[len(prompt):])) > 1   # the comparison below has power
    r = _cli(cons, "--prompt-ids", ",".join(map(str, prompt)), "--temperature", "0", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"=== [cons] prompt 1: {prompt}\n{tok.decode(want)}\n"


def test_generate_cli_refuses_a_tag_without_the_complete_marker(tmp_path):
    """--tag naming a half-written DeepSpeed tag (no 'complete' marker) is one error line, exit 2."""
    for step, done in ((2, True), (3, False)):
        (tmp_path / f"global_step{step}").mkdir()
        if done:
            (tmp_path / f"global_step{step}" / "complete").write_text("ok\n")
    r = _cli(tmp_path, "--tag", "global_step3", "--prompt", "a")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'global_step3'}: incomplete checkpoint"), r.stderr
    assert "the newest complete tag is global_step2" in r.stderr


def _one_error(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    return r.stderr.strip()


def test_generate_cli_refuses_a_tokenizer_with_fewer_ids_than_the_model(tmp_path, sp_model):
    """A 400-id tokenizer for a 1000-id model: one line naming both sizes and the tokenizer, before any
    sampling (not sentencepiece's IndexError when the model samples an id past 399)."""
    from pathlib import Path

    from megagpt.checkpoint.consolidated import save_consolidated

    model = _model("tiny-gpt2")
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg, tokenizer_path=sp_model)
    small = Path(__file__).parent / "fixtures" / "legacy_v0" / "tokenizer.model"   # 400 ids
    err = _one_error(_cli(cons, "--prompt", "x", "--tokenizer", small, "--max-new-tokens", "20"))
    assert f"tokenizer {small} has 400 ids but the model of {cons} has 1000" in err, err


def test_generate_cli_given_a_tag_dir_names_its_parent_and_tag(tmp_path):
    for step in (2, 3):
        (tmp_path / "ck" / f"global_step{step}").mkdir(parents=True)
        (tmp_path / "ck" / f"global_step{step}" / "complete").write_text("ok\n")
    tag = tmp_path / "ck" / "global_step3"
    err = _one_error(_cli(tag, "--prompt", "a"))
    assert err == f"error: {tag}: a tag of the DeepSpeed checkpoint {tmp_path / 'ck'}, not a checkpoint itself: " \
                  f"pass {tmp_path / 'ck'} with --tag global_step3", err
