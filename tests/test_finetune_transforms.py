"""GPT-1 input transforms on ids, truncation keeping the answer side, padding + cls gather, heads."""
import pytest
import torch

from megagpt.errors import MegaGPTError
from megagpt.finetune import transforms as T
from megagpt.finetune.heads import FinetuneModel
from megagpt.finetune.readers import Example
from megagpt.finetune.tasks import encode, get_task

SP = T.SpecialIds(bos=2, delim=4, cls=5, pad=0)
S, D, C, P = 2, 4, 5, 0


def test_layouts_exact():
    x, y = [10, 11, 12], [20, 21]
    assert T.classification(x, SP, 64) == [[S, 10, 11, 12, C]]
    assert T.entailment(x, y, SP, 64) == [[S, 10, 11, 12, D, 20, 21, C]]
    both = [[S, 10, 11, 12, D, 20, 21, C], [S, 20, 21, D, 10, 11, 12, C]]
    assert T.similarity(x, y, SP, 64) == both and T.similarity(y, x, SP, 64) == both   # canonical order
    assert T.multiple_choice(x, [[30], [40, 41]], SP, 64) == [[S, 10, 11, 12, D, 30, C], [S, 10, 11, 12, D, 40, 41, C]]


def test_truncation_keeps_answer_side_and_specials():
    premise, hyp = list(range(100, 110)), [20, 21, 22]
    out = T.pair(premise, hyp, SP, 9)          # room 6: hypothesis 3 kept, premise keeps its last 3
    assert out == [S, 107, 108, 109, D, 20, 21, 22, C] and len(out) == 9
    out = T.pair(premise, list(range(200, 210)), SP, 8)   # answer alone overflows: premise empty, answer cut at right
    assert out == [S, D, 200, 201, 202, 203, 204, C]
    assert T.single(list(range(100, 110)), SP, 5) == [S, 107, 108, 109, C]   # keeps the end
    for seqs in (T.similarity(premise, hyp, SP, 9), T.multiple_choice(premise, [hyp, [7]], SP, 9)):
        assert all(len(s) <= 9 and s[0] == S and s[-1] == C and s.count(D) == 1 for s in seqs)
    with pytest.raises(MegaGPTError):
        T.pair([1], [2], SP, 3)


def test_pad_batch_right_pads_and_finds_cls():
    ids, cls_pos, lm = T.pad_batch([[S, 10, C], [S, 10, 11, D, 12, C], [S, C]], P, C)
    assert ids.tolist() == [[S, 10, C, P, P, P], [S, 10, 11, D, 12, C], [S, C, P, P, P, P]]
    assert cls_pos.tolist() == [2, 5, 1]
    assert lm.tolist()[0] == [10, C, -100, -100, -100, -100]       # next-token targets, pad ignored
    assert lm.tolist()[1] == [10, 11, D, 12, C, -100]
    with pytest.raises(MegaGPTError, match="no <cls>"):
        T.pad_batch([[S, 10]], P, C)


def test_encode_with_real_tokenizer(sp_model):
    from megagpt.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_model)
    sp = T.SpecialIds.from_tokenizer(tok)
    assert (sp.bos, sp.delim, sp.cls, sp.pad) == (tok.bos_id, tok.delim_id, tok.cls_id, tok.pad_id)
    ex = Example(["To be, or not to be <cls>"], 1, choices=["that is the question", "whether"])
    a = tok.encode("To be, or not to be <cls>")
    seqs = encode(get_task("copa"), ex, tok.encode, sp, 64)
    assert seqs == [[sp.bos, *a, sp.delim, *tok.encode("that is the question"), sp.cls],
                    [sp.bos, *a, sp.delim, *tok.encode("whether"), sp.cls]]
    assert sp.cls not in a     # literal "<cls>" text cannot forge the extract token


def _tiny_ft(kind, num_outputs, regression=False, lm_coef=0.5):
    from megagpt.model import GPT, get_preset

    torch.manual_seed(0)
    return FinetuneModel(GPT(get_preset("tiny", vocab_size=64, max_seq_len=32)), kind, num_outputs,
                         regression, clf_dropout=0.1, lm_coef=lm_coef).eval()


def test_head_gathers_cls_not_last_column():
    m = _tiny_ft("classification", 3)
    short = [S, 10, 11, C]
    ids, cls_pos, _ = T.pad_batch([short, [S, 10, 11, 12, 13, 14, C]], P, C)
    _, out, _ = m(ids, cls_pos)
    alone = m(torch.tensor([short]), torch.tensor([3]))[1]
    torch.testing.assert_close(out[0], alone[0])    # padding after <cls> changes nothing (causal)
    h = m.gpt.forward_hidden(ids)
    torch.testing.assert_close(out[0], m.head(h[0, 3]))


def test_similarity_order_invariant_exactly():
    m = _tiny_ft("similarity", 1, regression=True)
    a, b = [10, 11, 12], [20, 21, 22, 23]
    outs = []
    for x, y in ((a, b), (b, a)):
        ids, cls_pos, _ = T.pad_batch(T.similarity(x, y, SP, 32), P, C)
        outs.append(m(ids, cls_pos, batch_size=1)[1])
    assert outs[0].shape == (1,) and torch.equal(outs[0], outs[1])
    # the output is the head on the *sum* of both orders' <cls> states, which really differ
    ids, cls_pos, _ = T.pad_batch([T.pair(a, b, SP, 32), T.pair(b, a, SP, 32)], P, C)
    h = m.gpt.forward_hidden(ids)[torch.arange(2), cls_pos]
    assert not torch.allclose(h[0], h[1])
    torch.testing.assert_close(outs[0], m.head(h[0] + h[1]))


def test_multiple_choice_normalises_over_answers():
    m = _tiny_ft("multiple_choice", 1)
    seqs = [s for ctx in ([10, 11], [12]) for s in T.multiple_choice(ctx, [[20], [21, 22], [23]], SP, 32)]
    ids, cls_pos, lm = T.pad_batch(seqs, P, C)
    labels = torch.tensor([2, 0])
    loss, out, parts = m(ids, cls_pos, lm, labels, batch_size=2)
    assert out.shape == (2, 3)
    probs = m.probabilities(out)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    ref = torch.nn.functional.cross_entropy(out, labels)
    torch.testing.assert_close(parts["task"], ref)
    torch.testing.assert_close(loss, parts["task"] + 0.5 * parts["lm"])   # L3 = L2 + λ L1
    torch.testing.assert_close(parts["lm"], m.gpt(ids, labels=lm))       # L1 = the model's own LM loss


def test_lm_coef_zero_disables_aux_loss_and_dropout_in_train():
    m = _tiny_ft("entailment", 2, lm_coef=0.0)
    ids, cls_pos, lm = T.pad_batch([[S, 10, D, 11, C]] * 4, P, C)
    loss, out, parts = m(ids, cls_pos, lm, torch.tensor([0, 1, 0, 1]))
    assert "lm" not in parts and torch.equal(loss, parts["task"])
    torch.testing.assert_close(out[0], out[1])      # eval: no dropout
    m.train()
    out = m(ids, cls_pos)[1]
    assert not torch.allclose(out[0], out[1])       # classifier dropout 0.1 active in training
