"""GPT decoder: causality, presets and parameter counts, init, config errors, kernel dispatch,
activation checkpointing, KV cache, and exact parity with transformers' GPT-1/GPT-2/Llama."""
import math

import pytest
import torch

import megagpt_kernels
from megagpt.errors import MegaGPTError
from megagpt.model import GPT, PRESETS, ModelConfig, get_preset

FAMILIES = ["tiny", "tiny-gpt2", "tiny-modern"]


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(get_preset(name, **overrides))


def _expected_params(cfg: ModelConfig) -> int:
    """Parameter count from the architecture alone, independent of how GPT builds its modules."""
    d, L, f, D = cfg.n_embd, cfg.n_layer, cfg.ffn_dim, cfg.head_dim
    b = 1 if cfg.bias else 0
    qkv_out = (cfg.n_head + 2 * cfg.num_kv_heads) * D
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = d * qkv_out + b * qkv_out + d * d + b * d
    n_up = 2 if cfg.activation == "swiglu" else 1
    mlp = n_up * (d * f + b * f) + f * d + b * d
    total = L * (attn + mlp + 2 * norm)
    total += cfg.padded_vocab_size * d * (1 if cfg.tie_embeddings else 2)
    total += cfg.max_seq_len * d if cfg.pos_emb == "learned" else 0
    total += norm if cfg.norm_position == "pre" else 0
    return total


# ---- causality, shapes, hidden states --------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_future_tokens_do_not_change_past_logits(name):
    model = _model(name).eval()
    x = torch.randint(0, 1000, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert lx.shape == (2, 24, 1000)  # sliced to vocab_size, not the padded 1024
    torch.testing.assert_close(lx[:, :12], ly[:, :12], rtol=0, atol=1e-6)
    assert (lx[:, 12:] - ly[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_hidden_feeds_the_lm_head(name):
    model = _model(name).eval()
    x = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        h = model.forward_hidden(x)
        logits = model(x)
    assert h.shape == (2, 10, 64)
    torch.testing.assert_close(logits, (h @ model.lm_head.weight.T)[..., :1000])
    if model.cfg.norm_position == "pre":  # ln_f output: unit-variance rows at init (weight 1, bias 0)
        if model.cfg.norm == "layernorm":
            torch.testing.assert_close(h.mean(-1), torch.zeros(2, 10), atol=1e-5, rtol=0)
    else:
        assert model.ln_f is None


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_forward_matches_full_forward(name):
    model = _model(name).eval()
    x = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache()
        parts = [model(x[:, :7], kv_cache=cache)]
        parts += [model(x[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_a_clear_error():
    model = _model("tiny")
    with pytest.raises(MegaGPTError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---- tied embeddings, init -----------------------------------------------------------------
def test_tied_embedding_is_one_parameter_with_one_summed_gradient():
    tied = _model("tiny-gpt2")
    assert tied.lm_head.weight is tied.embed.tok.weight
    assert sum(p is tied.embed.tok.weight for p in tied.parameters()) == 1
    untied = GPT(get_preset("tiny-gpt2", tie_embeddings=False))
    sd = tied.state_dict()
    sd["lm_head.weight"] = sd["embed.tok.weight"].clone()
    untied.load_state_dict(sd)
    x = torch.randint(0, 1000, (2, 16))
    tied(x, labels=x).backward()
    untied(x, labels=x).backward()
    expected = untied.embed.tok.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(tied.embed.tok.weight.grad, expected)


def test_meta_build_then_materialise_keeps_weights_tied():
    with torch.device("meta"):
        model = GPT(get_preset("tiny-gpt2"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.tok.weight
    assert abs(model.embed.tok.weight.std().item() - 0.02) < 0.002


def test_init_statistics():
    model = _model("tiny-gpt2", n_embd=128, ffn_hidden=512)
    L = model.cfg.n_layer
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".ln" in name or name.startswith("ln_f"):
            assert torch.all(p == 1), name
        else:
            std = 0.02 / math.sqrt(2 * L) if name.endswith("proj.weight") else 0.02
            assert abs(p.std().item() - std) < 0.05 * std, (name, p.std().item(), std)
            assert abs(p.mean().item()) < 0.1 * std, name
    unscaled = _model("tiny-gpt2", n_embd=128, ffn_hidden=512, scaled_residual_init=False)
    assert abs(unscaled.blocks[0].mlp.proj.weight.std().item() - 0.02) < 0.001


# ---- presets and parameter counts ----------------------------------------------------------
def test_gpt1_parameter_count_analytic_and_built():
    cfg = get_preset("gpt1")
    assert cfg.padded_vocab_size == 40064
    # 12 blocks of 7,087,872 + tied token table 40064*768 + positions 512*768; no final norm.
    expected = 12 * 7_087_872 + 40064 * 768 + 512 * 768
    assert expected == _expected_params(cfg) == 116_216_832  # "117M" (GPT-1 itself had 40478 tokens)
    with torch.device("meta"):  # the built structure, without paying for a 117M-parameter CPU init
        model = GPT(cfg)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == 12 * 7_087_872
    assert {n for n, _ in model.named_parameters() if n.startswith("ln_f")} == set()


@pytest.mark.parametrize("name,count", [
    ("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_parameter_counts_match_hf(name, count):
    cfg = get_preset(name, pad_vocab_multiple=1)
    assert _expected_params(cfg) == count
    with torch.device("meta"):  # the built structure, without paying for a CPU init
        assert GPT(cfg).num_params() == count


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_padded_vocab(name):
    cfg = get_preset(name)
    assert cfg.padded_vocab_size % 128 == 0 and 0 <= cfg.padded_vocab_size - cfg.vocab_size < 128
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == _expected_params(cfg)
    assert model.embed.tok.weight.shape == (cfg.padded_vocab_size, cfg.n_embd)
    n = model.num_params(non_embedding=True)
    per_layer = n / cfg.n_layer
    assert model.flops_per_token(cfg.max_seq_len) == 6 * (n + cfg.padded_vocab_size * cfg.n_embd) + \
        12 * cfg.n_layer * cfg.n_embd * cfg.max_seq_len
    assert per_layer > 0


def test_swiglu_default_width_and_gqa_shapes():
    cfg = get_preset("modern-small")
    assert cfg.ffn_dim == 2048 and cfg.num_kv_heads == 4  # 8/3 * 768 = 2048, a multiple of 64
    assert get_preset("tiny-modern").ffn_dim == 192      # 8/3 * 64 = 170.7 -> 192
    model = _model("tiny-modern")
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.embed.pos is None and not model.cfg.tie_embeddings


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h reads kv head h // (n_head / n_kv_head), the grouping HF Llama uses."""
    gqa = _model("tiny-modern").eval()
    mha = GPT(get_preset("tiny-modern", n_kv_head=None)).eval()
    sd = gqa.state_dict()
    D, Hq, Hkv = 16, 4, 2
    for i in range(2):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([Hq * D, Hkv * D, Hkv * D])
        rep = lambda t: t.view(Hkv, D, -1).repeat_interleave(Hq // Hkv, dim=0).reshape(Hq * D, -1)  # noqa: E731
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x))


# ---- config validation ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"n_embd": 100, "n_head": 3}, r"n_embd=100 must be divisible by n_head=3"),
    ({"n_kv_head": 3}, r"n_kv_head=3 must divide n_head=4"),
    ({"norm": "batchnorm"}, r"norm='batchnorm' must be one of layernorm, rmsnorm"),
    ({"activation": "relu"}, r"activation='relu'"),
    ({"n_layer": 0}, r"n_layer=0 must be >= 1"),
    ({"n_layer": 2.0}, r"n_layer=2.0 must be of type int"),
    ({"bias": "yes"}, r"bias='yes' must be of type bool"),
    ({"attn_dropout": 1.0}, r"attn_dropout=1.0 must be in \[0, 1\)"),
    ({"n_embd": 60, "n_head": 4, "n_kv_head": 2}, r"rope needs an even head_dim"),
    ({"colour": "red"}, r"unknown key\(s\) 'colour'; known keys: vocab_size, n_layer"),
])
def test_config_errors_name_field_and_value(overrides, match):
    with pytest.raises(MegaGPTError, match=match):
        get_preset("tiny-modern", **overrides)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(MegaGPTError, match="unknown model preset 'gpt3'.*gpt1, gpt2-small"):
        get_preset("gpt3")


def test_config_dict_round_trip():
    cfg = get_preset("tiny-modern", n_layer=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MegaGPTError, match="unknown key"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


# ---- kernel dispatch -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", ["tiny", "tiny-modern"])
def test_norm_and_attention_go_through_dispatch_to_reference_on_cpu(monkeypatch, backend, name):
    monkeypatch.setenv("MEGAGPT_KERNELS", backend)
    calls = {}
    for op in ("layer_norm", "rms_norm", "attention"):
        real = getattr(megagpt_kernels.reference, op)

        def spy(*args, _op=op, _real=real):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*args)

        monkeypatch.setattr(megagpt_kernels.reference, op, spy)
    model = _model(name)
    model(torch.randint(0, 1000, (1, 8)))
    norm_op = "rms_norm" if name == "tiny-modern" else "layer_norm"
    n_norms = 2 * 2 + (1 if model.ln_f is not None else 0)
    assert calls == {"attention": 2, norm_op: n_norms}


# ---- training behaviour --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-modern"])
def test_activation_checkpointing_gives_identical_loss_and_grads(name):
    x = torch.randint(0, 1000, (2, 32))
    results = []
    for ckpt in (False, True):
        model = _model(name, activation_checkpointing=ckpt, embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1)
        torch.manual_seed(1)
        loss = model(x, labels=x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_decreases_when_overfitting_a_tiny_batch(name):
    model = _model(name)
    x = torch.randint(0, 1000, (4, 32))
    labels = x.roll(-1, dims=1)
    labels[:, -1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(1000), rel=0.1)  # near-uniform at init
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("which", ["embd_dropout", "resid_dropout", "attn_dropout"])
def test_each_dropout_acts_in_training_only(which):
    model = _model("tiny-modern", **{which: 0.5})
    x = torch.randint(0, 1000, (2, 16))
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_ignored_labels_do_not_count():
    model = _model("tiny").eval()
    x = torch.randint(0, 1000, (1, 10))
    labels = x.clone()
    labels[:, 5:] = -100
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits[0, :5], x[0, :5])
        torch.testing.assert_close(model(x, labels=labels), expected)


# ---- exact parity with transformers (test-local weight mappings) ---------------------------
def _copy_into_hf(hf_model, ours, mapping):
    """Copy every HF parameter from ``mapping(hf_name) -> our tensor`` (all must be covered)."""
    sd = ours.state_dict()
    with torch.no_grad():
        for hf_name, p in hf_model.named_parameters():
            src = mapping(hf_name, sd)
            assert src.shape == p.shape, (hf_name, src.shape, p.shape)
            p.copy_(src)


def _gpt_conv1d_mapping(prefix, vocab):
    """GPT-1/GPT-2 names; HF Conv1D stores (in, out), so our Linear weights are transposed."""
    names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}

    def mapping(hf_name, sd):
        if hf_name in (f"{prefix}.wte.weight", f"{prefix}.tokens_embed.weight", "lm_head.weight"):
            return sd["embed.tok.weight"][:vocab]
        if hf_name in (f"{prefix}.wpe.weight", f"{prefix}.positions_embed.weight"):
            return sd["embed.pos.weight"]
        if hf_name.startswith(f"{prefix}.ln_f."):
            return sd[hf_name[len(prefix) + 1:]]
        layer, rest = hf_name[len(prefix) + 3:].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        t = sd[f"blocks.{layer}.{names[module]}.{kind}"]
        return t.T if kind == "weight" and not module.startswith("ln") else t

    return mapping


def _parity_input():
    return torch.randint(0, 1000, (2, 40))


def test_pre_ln_block_is_exactly_gpt2():
    transformers = pytest.importorskip("transformers")
    ours = _model("tiny-gpt2", n_layer=3).eval()  # vocab 1000 padded to 1024: HF gets the first 1000 rows
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=3, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        attn_implementation="eager",
    )).eval()
    _copy_into_hf(hf, ours, _gpt_conv1d_mapping("transformer", 1000))
    x = _parity_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
        labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)  # ours are pre-shifted, HF shifts
        torch.testing.assert_close(ours(x, labels=labels), hf(x, labels=x).loss, atol=1e-5, rtol=0)


def test_post_ln_block_is_exactly_gpt1():
    transformers = pytest.importorskip("transformers")
    # init_std 0.3: activations of order 1, where exact and tanh GELU differ by ~1e-4 (at the
    # default 0.02 init both are ~linear and this test could not tell them apart).
    ours = _model("tiny", n_layer=3, init_std=0.3).eval()
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=3, n_head=4, afn="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )).eval()
    _copy_into_hf(hf, ours, _gpt_conv1d_mapping("transformer", 1000))
    x = _parity_input()
    # Measured: tanh GELU 3.5e-5 (float rounding at these magnitudes); exact GELU 6.4e-3.
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-4, rtol=0)
        torch.testing.assert_close(ours.forward_hidden(x), hf.transformer(x).last_hidden_state, atol=2e-4, rtol=0)


def test_modern_block_is_exactly_llama():
    """RMSNorm + rotate-half RoPE + SwiGLU + GQA, untied head: transformers' Llama."""
    transformers = pytest.importorskip("transformers")
    ours = _model("tiny-modern", n_layer=3).eval()
    cfg = ours.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=cfg.ffn_dim, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation="eager",
    )).eval()
    q, kv = 4 * 16, 2 * 16
    names = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2", "self_attn.o_proj": "attn.proj",
             "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.fc", "mlp.down_proj": "mlp.proj"}

    def mapping(hf_name, sd):
        if hf_name == "model.embed_tokens.weight":
            return sd["embed.tok.weight"][:1000]
        if hf_name == "lm_head.weight":
            return sd["lm_head.weight"][:1000]
        if hf_name == "model.norm.weight":
            return sd["ln_f.weight"]
        layer, module = hf_name[len("model.layers."):].rsplit(".", 1)[0].split(".", 1)
        if module.startswith("self_attn.") and module[-6:] in ("q_proj", "k_proj", "v_proj"):
            w = sd[f"blocks.{layer}.attn.qkv.weight"]
            return {"q_proj": w[:q], "k_proj": w[q:q + kv], "v_proj": w[q + kv:]}[module[-6:]]
        return sd[f"blocks.{layer}.{names[module]}.weight"]

    _copy_into_hf(hf, ours, mapping)
    x = _parity_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [0, 8])
def test_masked_labels_count_nothing_and_a_fully_masked_chunk_adds_zero(chunk):
    """The loss is the mean over labels != -100 (also computed ``chunk`` tokens at a time); a chunk
    or a whole batch with no counted label adds 0 with a finite gradient, as the tensor-parallel
    loss does, instead of F.cross_entropy's 0/0 = NaN."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=300, max_seq_len=40))
    model.loss_chunk_tokens = chunk
    x, y = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    y[0, :20] = -100   # chunks 1-2 of 8 tokens hold no counted label
    loss = model(x, labels=y)
    loss.backward()
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert abs(loss.item() - want.item()) < 1e-5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    none = model(x, labels=torch.full_like(y, -100))
    none.backward()
    assert none.item() == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
