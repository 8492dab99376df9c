"""Document masking of packed samples: data.reset_attention_mask, reset_position_ids, eod_mask_loss.

The property that matters: with all three on, each document of a packed window gets exactly the
logits (and loss terms) it gets when the model runs on that document alone, for random document
lengths (seeded packs), learned positions and RoPE. Around it: the batch split (document ids,
reset positions, EOD labels) against a per-token loop, the off path (no mask built, identical to
the plain causal batch), the Triton kernel against the reference with the mask (forward and
backward, in the CPU interpreter), the pipeline refusal, and one real TP=2 + sequence-parallel
training run whose first logged loss is the serial packed loss of the same batch.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreter_ready

# Before anything here imports triton: True if this process can interpret the kernels on CPU.
INTERPRETED = importlib.util.find_spec("triton") is not None and interpreter_ready()

from megagpt.data import DataConfig                                   # noqa: E402
from megagpt.data.gpt_dataset import (PackedInputs, PackingOptions,  # noqa: E402
                                      document_ids, reset_positions, split_batch)
from megagpt.errors import MegaGPTError                              # noqa: E402
from megagpt.model import GPT                                        # noqa: E402
from megagpt.model.presets import get_preset                         # noqa: E402
from megagpt_kernels import reference                                # noqa: E402

EOD, VOCAB, T = 3, 64, 64
ALL_ON = PackingOptions(EOD, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)


def random_pack(seed, batch=2, length=T + 1):
    """``batch`` windows of ``length`` tokens cut from a stream of random documents (lengths drawn
    from a seeded generator: 1..40 tokens, the last one EOD); returns the windows and, per row, the
    documents as (start, end) spans inside the window (the last may be cut off without its EOD)."""
    g = torch.Generator().manual_seed(seed)
    rows, spans = [], []
    for _ in range(batch):
        toks, row_spans = [], []
        while len(toks) < length:
            n = int(torch.randint(1, 41, (1,), generator=g))
            doc = torch.randint(EOD + 1, VOCAB, (n,), generator=g).tolist()
            doc[-1] = EOD
            row_spans.append((len(toks), min(len(toks) + n, length - 1)))
            toks += doc
        rows.append(toks[:length])
        spans.append([(a, b) for a, b in row_spans if a < length - 1])
    return torch.tensor(rows), spans


def model_for(pos_emb):
    torch.manual_seed(0)
    if pos_emb == "rope":   # RoPE, GQA, SwiGLU, RMSNorm, pre-LN
        cfg = get_preset("tiny-modern", vocab_size=VOCAB, max_seq_len=T)
    else:                   # learned positions, post-LN (GPT-1)
        cfg = get_preset("tiny", vocab_size=VOCAB, max_seq_len=T)
    return GPT(cfg).eval()


# ------------------------------------------------------------------------------ the batch
def test_off_is_the_plain_split_and_builds_nothing():
    tokens, _ = random_pack(0)
    x, y = split_batch(tokens, None)
    assert type(x) is torch.Tensor and torch.equal(x, tokens[:, :-1]) and torch.equal(y, tokens[:, 1:])
    fields = DataConfig.__dataclass_fields__
    assert all(fields[k].default is False for k in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_ids_and_positions_follow_the_eod_tokens(seed):
    """The vectorised ids/positions against the definition, token by token."""
    tokens, _ = random_pack(seed, batch=3)
    x, y = split_batch(tokens, ALL_ON)
    assert isinstance(x, PackedInputs) and torch.equal(x.input_ids, tokens[:, :-1])
    for b in range(tokens.shape[0]):
        doc, pos = 0, 0
        for t in range(T):
            assert x.doc_ids[b, t] == doc and x.position_ids[b, t] == pos, (b, t)
            pos += 1
            if tokens[b, t] == EOD:   # the EOD ends its document: the next token starts the next one
                doc, pos = doc + 1, 0
    assert torch.equal(y == -100, tokens[:, :-1] == EOD) and torch.equal(y[y != -100], tokens[:, 1:][y != -100])
    # each option alone sets only its own part
    only_pos = split_batch(tokens, PackingOptions(EOD, reset_position_ids=True))
    assert only_pos[0].doc_ids is None and torch.equal(only_pos[0].position_ids, x.position_ids)
    assert torch.equal(only_pos[1], tokens[:, 1:])
    only_loss = split_batch(tokens, PackingOptions(EOD, eod_mask_loss=True))
    assert type(only_loss[0]) is torch.Tensor and torch.equal(only_loss[1], y)


def test_helpers_on_a_hand_written_row():
    row = torch.tensor([[5, 3, 3, 7, 8, 3, 9]])
    assert document_ids(row, 3).tolist() == [[0, 0, 1, 2, 2, 2, 3]]
    assert reset_positions(row, 3).tolist() == [[0, 1, 0, 0, 1, 2, 0]]


# ------------------------------------------------------------------------------ the property
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_packed_documents_equal_each_document_alone(pos_emb, seed):
    """A token never attends across an EOD: every document's logits in the pack are its logits alone."""
    model = model_for(pos_emb)
    tokens, spans = random_pack(seed)
    x, y = split_batch(tokens, ALL_ON)
    with torch.no_grad():
        packed = model(x)
        alone = torch.zeros_like(packed)
        for b, row_spans in enumerate(spans):
            assert len(row_spans) >= 2   # a real pack, not one document
            for a, e in row_spans:
                alone[b, a:e] = model(x.input_ids[b:b + 1, a:e])[0]
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
        # the loss: the same targets scored by the per-document logits, positions at EOD inputs left out
        loss = model(x, labels=y)
        expect = F.cross_entropy(alone.flatten(0, 1), y.flatten(), ignore_index=-100)
        assert abs(loss.item() - expect.item()) < 1e-5 and (y == -100).sum() == (tokens[:, :-1] == EOD).sum() > 0
        # and without the options the same pack does see across documents
        plain = model(tokens[:, :-1])
        assert (plain - alone).abs().max() > 1e-3


def test_rope_angles_follow_the_reset_positions():
    """RoPE is relative, so with the attention mask on, reset positions change nothing (above):
    checked here on their own. The angles are the plain table's rows at the reset positions, and
    reset positions alone (no mask) leave the first document's logits and change the later ones'."""
    from megagpt.model.embedding import rope_cos_sin

    model = model_for("rope")
    tokens, spans = random_pack(21)
    x, _ = split_batch(tokens, PackingOptions(EOD, reset_position_ids=True))
    cos, sin = rope_cos_sin(model.cfg, 0, T, "cpu", x.position_ids)
    table_cos, table_sin = rope_cos_sin(model.cfg, 0, T, "cpu")
    assert torch.equal(cos[:, 0], table_cos[x.position_ids]) and torch.equal(sin[:, 0], table_sin[x.position_ids])
    with torch.no_grad():
        reset, plain = model(x), model(x.input_ids)
    for b, row_spans in enumerate(spans):
        (a0, e0), (a1, e1) = row_spans[0], row_spans[1]
        torch.testing.assert_close(reset[b, a0:e0], plain[b, a0:e0], atol=1e-5, rtol=0)
        assert (reset[b, a1:e1] - plain[b, a1:e1]).abs().max() > 1e-4


def test_eod_mask_loss_gives_eod_inputs_no_gradient():
    """Megatron's rule: the position whose input is EOD (it would predict the next document's first
    token) gets no gradient; the position predicting the EOD keeps its loss."""
    model = model_for("learned")
    tokens, _ = random_pack(5)
    x, y = split_batch(tokens, PackingOptions(EOD, eod_mask_loss=True))
    logits = model(x).detach().requires_grad_()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    eod_inputs = tokens[:, :-1] == EOD
    assert eod_inputs.any() and (logits.grad[eod_inputs] == 0).all()
    assert (logits.grad[~eod_inputs].abs().sum(-1) > 0).all()
    assert (logits.grad[tokens[:, 1:] == EOD].abs().sum(-1) > 0).all()   # predicting EOD is trained
    assert abs(model(x, labels=y).item() - loss.item()) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_a_step_weighs_every_counted_token_alike_at_any_split(seed):
    """``loop.weights_of``: however the global batch is cut (micro-batches x accumulation x DP
    ranks), equal-weight averaging of the weighted micro-batch means (what DeepSpeed does) is the
    mean over every counted token of the batch; nothing masked: no factors (untouched)."""
    from megagpt.train.loop import weights_of

    g = torch.Generator().manual_seed(seed)
    tokens, _ = random_pack(seed, batch=12)
    x, y = split_batch(tokens, PackingOptions(EOD, eod_mask_loss=True))
    per_token = torch.rand(y.shape, generator=g, dtype=torch.float64)
    want = per_token[y != -100].mean()
    for dp, ga in ((1, 1), (1, 12), (2, 3), (3, 2), (4, 3)):
        rows = y.chunk(dp * ga)   # rank r holds micro-batches r*ga .. r*ga+ga-1
        counts = [int((r != -100).sum()) for r in rows]
        means = [per_token[i * len(rows[0]):(i + 1) * len(rows[0])][r != -100].mean() for i, r in enumerate(rows)]
        got = 0.0
        for r in range(dp):
            w = weights_of(counts[r * ga:(r + 1) * ga], sum(counts), dp) or [1.0] * ga
            got += sum(f * m for f, m in zip(w, means[r * ga:(r + 1) * ga])) / (ga * dp)
        assert abs(got - want) < 1e-12, (dp, ga, got, want)
    assert len(set(counts)) > 1   # the pack has ends of documents in some rows only
    assert weights_of([40, 40], 160, 2) is None and weights_of([0, 0], 0, 1) is None


def test_activation_checkpointing_carries_the_mask():
    """The recomputed blocks in backward see the same document ids (gradients equal)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny-modern", vocab_size=VOCAB, max_seq_len=T)
    plain = GPT(cfg)
    ckpt = GPT(get_preset("tiny-modern", vocab_size=VOCAB, max_seq_len=T, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, y = split_batch(random_pack(3)[0], ALL_ON)
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(x, labels=y).backward()
        grads.append(m.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ the off path
def test_off_path_builds_no_mask_and_single_document_ids_change_nothing(monkeypatch):
    built = []
    real = reference.document_mask
    monkeypatch.setattr(reference, "document_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    for pos_emb in ("learned", "rope"):
        model = model_for(pos_emb)
        tokens, _ = random_pack(7)
        x, y = split_batch(tokens, None)
        with torch.no_grad():
            plain = model(x)
            plain_loss = model(x, labels=y)
        assert built == []   # the plain causal path: no mask is built anywhere
        one_doc = PackedInputs(x, torch.arange(T).expand_as(x), torch.zeros_like(x))
        with torch.no_grad():
            torch.testing.assert_close(model(one_doc), plain, atol=1e-6, rtol=0)
            assert abs(model(one_doc, labels=y).item() - plain_loss.item()) < 1e-6
        assert built   # ... and the mask path was the one taken just now
        built.clear()


def test_bad_shapes_and_kv_cache_are_refused():
    model = model_for("learned")
    x = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(MegaGPTError, match=r"doc_ids of shape \(1, 7\) must match input_ids \(1, 8\)"):
        model(x, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(MegaGPTError, match="cannot be used with a KV cache"):
        model(x, kv_cache=model.new_kv_cache(), position_ids=torch.arange(8)[None])


# ------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def data(shakespeare_prefix, sp_model):
    return shakespeare_prefix, sp_model


def test_options_reach_the_datasets_with_the_tokenizer_eod(data, tmp_path):
    from megagpt.data import build_gpt_datasets
    from megagpt.tokenizer import load_tokenizer

    prefix, tok = data
    cfg = DataConfig(data_path=[prefix], tokenizer=tok, seq_length=T, cache_dir=str(tmp_path),
                     reset_attention_mask=True, eod_mask_loss=True)
    train, _, _ = build_gpt_datasets(cfg, (8, 0, 0), 1000)
    assert train.packing == PackingOptions(load_tokenizer(tok).eod_id, True, False, True)
    off = DataConfig(data_path=[prefix], tokenizer=tok, seq_length=T, cache_dir=str(tmp_path))
    assert build_gpt_datasets(off, (8, 0, 0), 1000)[0].packing is None
    blend = DataConfig(data_path=[0.5, prefix, 0.5, prefix], tokenizer=tok, seq_length=T, cache_dir=str(tmp_path),
                       reset_position_ids=True)
    blended, _, _ = build_gpt_datasets(blend, (8, 0, 0), 1000)
    assert type(blended).__name__ == "BlendedDataset" and blended.packing.reset_position_ids
    no_tok = DataConfig(data_path=[prefix], seq_length=T, reset_position_ids=True)
    with pytest.raises(MegaGPTError, match="reset_position_ids needs the tokenizer's end-of-document id") as e:
        PackingOptions.from_config(no_tok)
    assert e.value.key == "reset_position_ids"


def test_pipeline_parallel_is_refused_in_one_line(data):
    from megagpt.config import MegaGPTConfig

    prefix, tok = data
    raw = {"model": {"preset": "tiny", "max_seq_len": T}, "data": {"data_path": [prefix], "tokenizer": tok,
                                                                   "reset_position_ids": True},
           "parallel": {"pipeline_parallel": 2}}
    with pytest.raises(MegaGPTError) as e:
        MegaGPTConfig.from_dict(raw, source="run.yaml")
    assert e.value.key == "data.reset_position_ids" and "needs pipeline_parallel=1 (got 2)" in str(e.value)
    assert "\n" not in str(e.value)
    raw["data"] = {**raw["data"], "reset_position_ids": False, "eod_mask_loss": True}   # labels only: fine
    assert MegaGPTConfig.from_dict(raw).data.eod_mask_loss


# ------------------------------------------------------------------------------ kernels
def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,eod_p,seed,dtype", [
    (1, 4, 2, 70, 70, 16, 0.12, 1, F32), (2, 2, 1, 33, 33, 32, 0.12, 2, F32),
    (1, 2, 2, 9, 45, 16, 0.12, 3, F32),      # the KV-cache (Tq < Tk) bottom-right mask
    (1, 2, 2, 100, 100, 16, 0.03, 4, F32),   # documents longer than a 32-wide tile: whole blocks skipped
    (1, 2, 2, 50, 50, 16, None, 5, F32),     # ids repeated out of order (not one run per document)
    (1, 2, 1, 130, 130, 16, 0.03, 6, BF16)])   # 64-wide bf16 tiles
def test_kernel_triton_matches_reference_with_document_mask(b, hq, hkv, tq, tk, d, eod_p, seed, dtype):
    """Forward and backward with random document ids (fp32: 32-wide tiles)."""
    if not INTERPRETED:
        pytest.skip("triton imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels.triton import flash_attention as fa

    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(b, hq, tq, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, hkv, tk, d, generator=g) for _ in range(2))
    if eod_p is None:
        doc = torch.randint(0, 3, (b, tk), generator=g)
    else:
        eod = torch.rand(b, tk, generator=g) < eod_p
        doc = eod.long().cumsum(1) - eod.long()
        assert (doc[:, -1] > 0).all()   # several documents per row
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    out = _grads(lambda q, k, v: fa.attention(q, k, v, True, 0.0, None, doc), q, k, v, do)
    ref = _grads(lambda q, k, v: reference.attention(q, k, v, True, 0.0, None, doc), q.float(), k.float(), v.float(),
                 do.float())
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name, a, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r.to(dtype).float(), **tol, msg=lambda m: f"{name}: {m}")
    plain = fa.attention(q, k, v, True, 0.0, None)
    assert (plain.float() - out[0].float()).abs().max() > 0.1   # the mask changed the result


def test_kernel_doc_table_bounds_each_document():
    """The per-key (id, first index, last index) table the kernel skips blocks by, against a loop."""
    if not INTERPRETED:
        pytest.skip("triton imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels.triton.flash_attention import _doc_table

    g = torch.Generator().manual_seed(9)
    for doc in (torch.randint(0, 4, (3, 30), generator=g), document_ids(random_pack(9)[0], EOD)):
        table = _doc_table(doc)
        for b in range(doc.shape[0]):
            row = doc[b].tolist()
            assert table[b, 0].tolist() == row
            assert table[b, 1].tolist() == [row.index(x) for x in row]
            assert table[b, 2].tolist() == [len(row) - 1 - row[::-1].index(x) for x in row]


def test_kernel_dispatch_sends_the_mask_to_triton(monkeypatch):
    if not INTERPRETED:
        pytest.skip("triton imported without TRITON_INTERPRET=1: covered by the subprocess test")
    from megagpt_kernels import dispatch
    from megagpt_kernels.triton import flash_attention as fa

    monkeypatch.setenv("MEGAGPT_KERNELS", "triton")
    dispatch.reset()
    q = k = v = torch.randn(1, 2, 20, 16)
    doc = torch.tensor([[0] * 7 + [1] * 13])
    out = dispatch.attention(q, k, v, doc_ids=doc)
    assert ("attention", "triton", "MEGAGPT_KERNELS=triton with TRITON_INTERPRET=1") in dispatch._logged
    torch.testing.assert_close(out, reference.attention(q, k, v, doc_ids=doc), atol=2e-5, rtol=1e-4)
    assert fa.unsupported_reason(q, k, v, False, 0.0, doc) == "a document mask without causal masking"
    dispatch.reset()


if not INTERPRETED and importlib.util.find_spec("triton") is not None:
    def test_kernel_in_triton_interpreter_subprocess():
        """This file's kernel tests in a fresh process with TRITON_INTERPRET=1 (only those: -k kernel)."""
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                            "-k", "kernel"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and " passed" in r.stdout, (r.stdout + r.stderr)[-6000:]


# ------------------------------------------------------------------------------ a real run
@pytest.mark.slow
def test_tp2_sequence_parallel_run_trains_with_packing(data, tmp_path):
    """2 ranks, TP=2 + sequence parallelism, all three options: the loss falls, validation runs on
    packed batches too, and step 1's logged loss is the serial model's packed loss on the same
    batch (so the options reached the model, and each TP rank added its own chunk's positions)."""
    import yaml

    from test_train_runs import launch, losses, make_config, ok
    from megagpt.config import load_config
    from megagpt.data import DistributedBatchSampler, build_gpt_datasets
    from megagpt.train.loop import to_batch

    path = tmp_path / "c.yaml"
    make_config(path, *data, train={"train_iters": 10, "log_interval": 1, "eval_interval": 10, "eval_iters": 1,
                                    "save_interval": 0, "lr_warmup_iters": 2})
    raw = yaml.safe_load(path.read_text())
    raw["data"].update(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    raw["parallel"] = {"tensor_parallel": 2, "sequence_parallel": True}
    path.write_text(yaml.safe_dump(raw))
    r = ok(launch(str(path), "zero1.json", tmp_path / "ckpt"))
    assert "dp=1 tp=2 pp=1 +sp" in r.stdout and "validation loss" in r.stdout, r.stdout[-2000:]
    ls = losses(tmp_path / "ckpt")
    assert sorted(ls) == list(range(1, 11)) and all(math.isfinite(v) for v in ls.values()), ls
    assert sum(ls[s] for s in (8, 9, 10)) / 3 < ls[1] - 0.3, ls

    cfg = load_config(str(path))
    t = cfg.train
    torch.manual_seed(t.seed)   # build_model's seeding: the run's initial weights
    model = GPT(cfg.model).eval()
    train_ds, _, _ = build_gpt_datasets(cfg.data, (t.train_iters * t.micro_batch_size, 0, 0), cfg.model.vocab_size)
    idx = next(iter(DistributedBatchSampler(len(train_ds), 0, t.micro_batch_size, 0, 1)))
    x, y = to_batch(train_ds, idx, "cpu")
    assert isinstance(x, PackedInputs) and (y == -100).any() and (x.doc_ids[:, -1] > 0).any()
    tokens = torch.stack([torch.from_numpy(train_ds[i]["tokens"]) for i in idx])
    with torch.no_grad():
        packed = model(x, labels=y).item()
        unmasked = model(tokens[:, :-1], labels=tokens[:, 1:]).item()   # the same batch, options off
    assert abs(packed - ls[1]) < 1e-4, (packed, ls[1])
    assert abs(unmasked - ls[1]) > 1e-3, (unmasked, ls[1])
