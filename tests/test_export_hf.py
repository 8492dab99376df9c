"""HF transformers export/import: a megagpt model exported to HF computes the same logits and
greedy generations in transformers (loaded with AutoModelForCausalLM, no custom code), HF → megagpt
→ HF is exact, the tokenizer encodes alike, and unfaithful configs / overwrites / crashes are refused
cleanly."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import load_model
from megagpt.checkpoint.consolidated import load_consolidated, save_consolidated
from megagpt.checkpoint.convert import convert
from megagpt.errors import MegaGPTError
from megagpt.model import GPT, generate, get_preset

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
SAMPLES = ["First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces\tand a tab 12345",
           "émoji 🙂 and 中文", "literal <cls> and <s> stay text", "", "trailing "]


def _random_model(preset, seed=0, **overrides):
    """Random init plus noise on every tensor, so norms and biases are not trivially 1 / 0."""
    torch.manual_seed(seed)
    model = GPT(get_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def consolidated_to_hf(src, out, **kw):
    return convert(src, out, "hf", **kw)


def hf_to_consolidated(src, out, **kw):
    return convert(src, out, "consolidated", **kw)


def _export(model, tmp_path, tokenizer=None):
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict(), tokenizer_path=tokenizer)
    return consolidated_to_hf(cons, tmp_path / "hf")


def _until_eos(row, eos):
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else row


CASES = {  # preset, overrides, HF class
    "gpt2": ("tiny-gpt2", {}, "GPT2LMHeadModel"),
    "gpt2-untied-gelu": ("tiny-gpt2", {"tie_embeddings": False, "activation": "gelu", "ffn_hidden": 96},
                         "GPT2LMHeadModel"),
    "gpt1": ("tiny", {"activation": "gelu_tanh"}, "OpenAIGPTLMHeadModel"),
    "llama-gqa": ("tiny-modern", {}, "LlamaForCausalLM"),
    "llama-bias-tied": ("tiny-modern", {"bias": True, "tie_embeddings": True, "n_kv_head": 1}, "LlamaForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers(case, tmp_path, sp_model):
    preset, overrides, hf_class = CASES[case]
    ours = _random_model(preset, **overrides)
    hf_dir = _export(ours, tmp_path, sp_model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()   # no trust_remote_code
    assert type(hf).__name__ == hf_class
    assert hf.config.vocab_size == 1000 and ours.cfg.padded_vocab_size == 1024   # padded rows dropped
    x = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff
    eos = hf.generation_config.eos_token_id
    assert eos == 3
    prompt = x[:, :6]
    ours_gen = generate(ours, prompt, max_new_tokens=16, temperature=0.0, eos_id=eos)
    hf_gen = hf.generate(prompt, max_new_tokens=16, do_sample=False)
    for a, b in zip(ours_gen, hf_gen):
        assert _until_eos(a, eos) == _until_eos(b, eos)


def test_hf_to_megagpt_to_hf_is_exact(tmp_path):
    """Models made by transformers itself (not by our exporter) survive the round trip bit for bit."""
    torch.manual_seed(0)
    made = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48, bos_token_id=None,
            eos_token_id=None, tie_word_embeddings=False)),
        "openai": transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
            vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, attention_bias=True, mlp_bias=True)),
    }
    x = torch.randint(0, 300, (1, 20))
    for name, model in made.items():
        src = tmp_path / f"{name}_src"
        model.save_pretrained(src)
        hf_to_consolidated(src, tmp_path / f"{name}_cons")
        ours = load_model(tmp_path / f"{name}_cons").model
        with torch.no_grad():
            assert (ours(x) - model.eval()(x).logits).abs().max().item() < 1e-4, name
        back = consolidated_to_hf(tmp_path / f"{name}_cons", tmp_path / f"{name}_back")
        a, b = model.state_dict(), transformers.AutoModelForCausalLM.from_pretrained(back).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, back))
        assert ca == cb, (name, {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)})


def test_consolidated_round_trip_keeps_model_and_tokenizer(tmp_path, sp_model):
    ours = _random_model("tiny-modern")
    cons = save_consolidated(tmp_path / "cons", ours.state_dict(), ours.cfg.to_dict(), tokenizer_path=sp_model)
    hf_dir = consolidated_to_hf(cons, tmp_path / "hf", max_shard_size="64KB")   # sharded + index
    assert len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    back = hf_to_consolidated(hf_dir, tmp_path / "back")
    sd, meta = load_consolidated(back)
    orig = ours.state_dict()
    for k, v in orig.items():
        assert torch.equal(sd[k][:1000], v[:1000]), k   # padded rows come back as zeros
    # every architectural field survives; HF configs carry no init scheme and spell defaults out
    from megagpt.model import ModelConfig

    got, want = ModelConfig.from_dict(meta["model"]), ours.cfg
    assert got.ffn_dim == want.ffn_dim
    skip = {"name", "ffn_hidden", "scaled_residual_init"}
    assert {k: v for k, v in got.to_dict().items() if k not in skip} == \
        {k: v for k, v in want.to_dict().items() if k not in skip}
    assert (back / "tokenizer" / "tokenizer.model").read_bytes() == Path(sp_model).read_bytes()


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2-bpe"])
def test_tokenizer_export_encodes_like_ours(kind, tmp_path, sp_model, shared_data):
    from megagpt.export.hf_tokenizer import export_tokenizer
    from megagpt.tokenizer import load_tokenizer

    src = sp_model if kind == "sentencepiece" else str(shared_data / "tokenizers" / "gpt2")
    export_tokenizer(src, tmp_path)
    ours, hf = load_tokenizer(src), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = (shared_data / "corpus" / "tinyshakespeare.txt").read_text()[:3000]
    for sample in SAMPLES + text.split("\n\n")[:20]:
        ids = ours.encode(sample)
        assert hf(sample)["input_ids"] == ids, sample
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf.convert_tokens_to_ids(["<delim>", "<cls>"]) == [ours.delim_id, ours.cls_id]
    assert set(hf.all_special_tokens) >= {"<delim>", "<cls>"}
    specials = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert specials["additional_special_tokens"] == ["<delim>", "<cls>"]


REFUSED = {  # overrides → a field the message must name
    "post-LN with rope": ("tiny-modern", {"norm_position": "post"}, "norm_position='post'"),
    "layernorm with swiglu": ("tiny-gpt2", {"activation": "swiglu"}, "norm='layernorm'"),
    "gelu in llama": ("tiny-modern", {"activation": "gelu_tanh"}, "activation='gelu_tanh'"),
    "gpt2 without bias": ("tiny-gpt2", {"bias": False}, "bias=False"),
    "gpt2 with GQA": ("tiny-gpt2", {"n_kv_head": 2}, "n_kv_head=2"),
    "gpt1 with wide MLP": ("tiny", {"activation": "gelu_tanh", "ffn_hidden": 96}, "ffn_hidden=96"),
    "gpt1 exact gelu": ("tiny", {"activation": "gelu"}, "activation='gelu'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unfaithful_configs_are_refused(case, tmp_path):
    preset, overrides, field = REFUSED[case]
    model = GPT(get_preset(preset, **overrides))
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict())
    with pytest.raises(MegaGPTError, match="no faithful HF transformers equivalent") as e:
        consolidated_to_hf(cons, tmp_path / "hf")
    assert field in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_exact_gelu_gpt1_exports_only_when_approximation_accepted(tmp_path):
    model = _random_model("tiny", activation="gelu")
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        consolidated_to_hf(cons, tmp_path / "hf", approximate_gelu=True))
    x = torch.randint(0, 1000, (1, 30))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert 0 < diff < 1e-2, diff   # close, but not the same function


def test_overwrite_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch, sp_model):
    model = _random_model("tiny-gpt2")
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict(), tokenizer_path=sp_model)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MegaGPTError, match="already exists; pass --force"):
        consolidated_to_hf(cons, out)
    assert (out / "keep").exists()

    import megagpt.export.hf as hf

    def crash(*a, **k):
        raise RuntimeError("disk full")   # mid-write: weights are already in the temp dir

    monkeypatch.setattr(hf, "export_tokenizer", crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        consolidated_to_hf(cons, fresh)
    with pytest.raises(RuntimeError, match="disk full"):
        consolidated_to_hf(cons, out, force=True)
    assert not fresh.exists() and (out / "keep").exists()   # old output untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp dirs left
    monkeypatch.undo()
    consolidated_to_hf(cons, out, force=True)
    assert not (out / "keep").exists() and (out / "config.json").exists()


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_converts_and_errors_are_one_line(tmp_path, capsys):
    model = _random_model("tiny-gpt2")
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict())
    main = _tool().main
    main(["--input", str(cons), "--to", "hf", "--output", str(tmp_path / "hf"), "--quiet"])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'hf'}"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    for args, msg in ((["--input", str(cons), "--to", "hf", "--output", str(tmp_path / "hf")], "already exists"),
                      (["--input", str(tmp_path / "nope"), "--to", "hf", "--output", str(tmp_path / "x")],
                       "no such file"),
                      (["--input", str(cons), "--to", "hf", "--output", str(tmp_path / "y"), "--tag", "global_step1"],
                       "--tag only applies"),
                      (["--input", str(tmp_path / "hf"), "--to", "hf", "--output", str(tmp_path / "z")],
                       "already a hf checkpoint")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, err
        assert err.count("\n") == 1, err
    helptext = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--help"],
                              capture_output=True, text=True, check=True).stdout   # the script runs standalone
    for flag in ("--input", "--output", "--to", "--tag", "--force", "--tokenizer", "--dtype", "--approximate-gelu"):
        assert flag in helptext


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _cli_error(main, capsys, args) -> str:
    """``main(args)`` exits 2 with one ``error:`` line (returned), no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_cli_never_writes_over_its_input_even_with_force(tmp_path, capsys, sp_model):
    """--output naming the input, a folder inside it (a tag of a training run) or the folder holding it
    would replace the input under --force: refused in one line, the input byte-identical."""
    model = _random_model("tiny-gpt2")
    cons = save_consolidated(tmp_path / "work" / "cons", model.state_dict(), model.cfg.to_dict(),
                             tokenizer_path=sp_model)
    (tmp_path / "alias").symlink_to(cons)
    before, main = _files(tmp_path / "work"), _tool().main
    for out, how in ((cons, "is"), (tmp_path / "alias", "is"), (cons / "tokenizer", "is inside"),
                     (cons / "new", "is inside"), (tmp_path / "work", "contains")):
        err = _cli_error(main, capsys, ["--input", str(cons), "--to", "hf", "--output", str(out), "--force"])
        assert err == f"error: --output {out}: {how} the --input {cons}; write the conversion elsewhere (not even " \
                      f"--force replaces the input)", err
        assert _files(tmp_path / "work") == before and not (cons / "new").exists()


def test_cli_checks_the_shard_size_and_the_tokenizer_before_writing(tmp_path, capsys, sp_model):
    model = _random_model("tiny-gpt2")   # 1000 ids
    cons = save_consolidated(tmp_path / "cons", model.state_dict(), model.cfg.to_dict(), tokenizer_path=sp_model)
    main, out = _tool().main, tmp_path / "hf"
    for size in ("0", "abc", "5", "-1GB", "1.5XB"):
        err = _cli_error(main, capsys, ["--input", str(cons), "--to", "hf", "--output", str(out),
                                        f"--max-shard-size={size}"])
        assert err == f"error: --max-shard-size {size}: expected a positive size with a unit KB, MB, GB or TB, " \
                      f"e.g. 2GB or 500MB", err
    small = REPO / "tests" / "fixtures" / "legacy_v0" / "tokenizer.model"   # 400 ids
    err = _cli_error(main, capsys, ["--input", str(cons), "--to", "hf", "--output", str(out), "--tokenizer",
                                    str(small)])
    assert f"tokenizer {small} has 400 ids but the model of {cons} has 1000" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cons"]


def test_convert_detects_formats_and_rejects_foreign_hf(tmp_path):
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(bert)
    with pytest.raises(MegaGPTError, match="not importable; supported: GPT2LMHeadModel"):
        convert(bert, tmp_path / "out", "megagpt")
    with pytest.raises(MegaGPTError, match="not a DeepSpeed checkpoint"):
        convert(tmp_path, tmp_path.parent / f"{tmp_path.name}-out2", "hf")   # (not inside: that is refused first)


def test_imports_old_hub_gpt2_layout(tmp_path):
    """pytorch_model.bin without the "transformer." prefix, with attn.bias buffers and the tied head."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=None, eos_token_id=None)).eval()
    hf.config.save_pretrained(tmp_path / "old")
    sd = {k.replace("transformer.", ""): v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    sd["h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin")
    ours = load_model(hf_to_consolidated(tmp_path / "old", tmp_path / "cons")).model
    x = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-5
    sd["h.0.mlp.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin")
    with pytest.raises(MegaGPTError, match=r"unexpected \['transformer.h.0.mlp.extra.weight'\]"):
        hf_to_consolidated(tmp_path / "old", tmp_path / "cons2")


@pytest.mark.parametrize("name,hf_name", [("ln", "model.layers.0.input_layernorm.weight"),      # copy entry
                                          ("k", "model.layers.0.self_attn.k_proj.weight"),       # rows of qkv
                                          ("vocab", "model.embed_tokens.weight")])               # vocab rows
def test_hf_weight_of_the_wrong_shape_is_named(tmp_path, name, hf_name):
    from safetensors.torch import load_file, save_file

    hf_dir = _export(_random_model("tiny-modern"), tmp_path)
    sd = load_file(str(hf_dir / "model.safetensors"))
    want = tuple(sd[hf_name].shape)
    sd[hf_name] = sd[hf_name][:-1].clone()
    save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    got = (want[0] - 1, *want[1:])
    with pytest.raises(MegaGPTError, match=re.escape(f"{hf_name} has shape {got}, expected {want}")):
        load_model(hf_dir)
