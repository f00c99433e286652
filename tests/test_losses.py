"""Per-example losses of Hugging Face heads (built from tiny configs) against hand-written per-example loops."""

import pytest
import torch
from torch import nn

from lightning_dp import losses
from lightning_dp.mechanisms.per_sample import PerSampleLossError

transformers = pytest.importorskip("transformers")

B, T, V = 4, 7, 23


def _ids(seed, shape=(B, T), low=1):
    return torch.randint(low, V, shape, generator=torch.Generator().manual_seed(seed))


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **kw)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


# ------------------------------------------------------------------------- hand-written references (explicit loops)
def ref_token_losses(logits, labels, shift, reduction, ignore_index=-100):
    """Loop over examples and positions: -log softmax(logits[i, t])[target], per example mean or sum (float64)."""
    out = []
    for i in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1] - (1 if shift else 0)):
            target = int(labels[i, t + 1 if shift else t])
            if target != ignore_index:
                terms.append(-torch.log_softmax(logits[i, t].double(), -1)[target])
        total = sum(terms, torch.tensor(0.0, dtype=torch.float64))
        out.append(total / len(terms) if reduction == "mean" and terms else total)
    return torch.stack(out)


def ref_classification(logits, labels, kind):
    out = []
    for i in range(logits.shape[0]):
        z, y = logits[i].double(), labels[i].double()
        if kind == "single":
            out.append(-torch.log_softmax(z, -1)[int(labels[i])])
        elif kind == "multi":
            p = torch.sigmoid(z)
            out.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
        else:
            out.append(((z.reshape(-1) - y.reshape(-1)) ** 2).mean())
    return torch.stack(out)


def hf_loss_of_each(model, batch):
    """Hugging Face's own loss of each example run alone (a batch of one): the per-example loss it means."""
    n = batch["labels"].shape[0]
    with torch.no_grad():
        return torch.stack([model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(n)])


def _close(a, b, atol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------- sequence classification
def _bert_classifier_batch(labels, **cfg):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config(**cfg)).eval()
    ids = _ids(0)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_single_label_classification():
    model, batch = _bert_classifier_batch(torch.tensor([0, 2, 1, 2]), num_labels=3)
    with torch.no_grad():
        out = model(**batch)
    got = losses.classification(out.logits, batch["labels"])
    assert got.dtype == torch.float32
    _close(got, ref_classification(out.logits, batch["labels"], "single"))
    _close(got, hf_loss_of_each(model, batch))
    _close(losses.from_hf_output(out, batch, model=model), got)


def test_multi_label_classification():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    model, batch = _bert_classifier_batch(labels, num_labels=3)
    with torch.no_grad():
        out = model(**batch)
    got = losses.classification(out.logits, labels)  # float labels: multi-label, as in Hugging Face
    _close(got, ref_classification(out.logits, labels, "multi"))
    _close(got, hf_loss_of_each(model, batch))
    _close(losses.classification(out.logits, labels, problem_type="multi_label_classification"), got)
    _close(losses.from_hf_output(out, batch, model=model), got)


def test_regression_one_output():
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    model, batch = _bert_classifier_batch(labels, num_labels=1)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (B, 1)
    got = losses.classification(out.logits, labels)
    _close(got, ref_classification(out.logits, labels, "regression"))
    _close(got, hf_loss_of_each(model, batch))
    _close(losses.classification(out.logits[:, 0], labels), got)  # [B] logits
    _close(losses.classification(out.logits, labels[:, None]), got)  # [B, 1] labels
    _close(losses.from_hf_output(out, batch, model=model), got)


def test_regression_several_outputs_uses_the_model_config():
    labels = torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, 2.0], [0.0, -3.0]])
    model, batch = _bert_classifier_batch(labels, num_labels=2, problem_type="regression")
    with torch.no_grad():
        out = model(**batch)
    got = losses.classification(out.logits, labels, problem_type="regression")
    _close(got, ref_classification(out.logits, labels, "regression"))
    _close(got, hf_loss_of_each(model, batch))
    # float labels [B, 2] alone would mean multi-label (Hugging Face's rule); the model's config says regression
    _close(losses.from_hf_output(out, batch, model=model), got)
    _close(losses.from_hf_output(out, batch), ref_classification(out.logits, labels, "multi"))


def test_single_label_ignore_index_gives_zero():
    logits = torch.randn(3, 4)
    got = losses.classification(logits, torch.tensor([1, -100, 3]))
    assert got[1] == 0 and got[0] > 0 and got[2] > 0


# ------------------------------------------------------------------------------------------------------ causal LM
def _gpt2_batch():
    ids = _ids(1)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[3, 1:] = -100  # only the first token, which is never a target: a sequence without targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_causal_lm_against_loops(reduction):
    torch.manual_seed(1)
    model, batch = _gpt2(), _gpt2_batch()
    with torch.no_grad():
        out = model(**batch)
    got = losses.causal_lm(out.logits, batch["labels"], reduction=reduction)
    assert got.shape == (B,) and got.dtype == torch.float32
    _close(got, ref_token_losses(out.logits, batch["labels"], shift=True, reduction=reduction))
    assert got[3] == 0
    if reduction == "mean":
        hf = hf_loss_of_each(model, batch)
        assert torch.isnan(hf[3])  # Hugging Face's 0/0 for the sequence without targets
        _close(got[:3], hf[:3])
    _close(losses.from_hf_output(out, batch, model=model, reduction=reduction), got)


def test_causal_lm_without_targets_has_zero_finite_gradient():
    torch.manual_seed(1)
    model, batch = _gpt2(), _gpt2_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = losses.causal_lm(logits, batch["labels"])
    (grad,) = torch.autograd.grad(per_example[3], logits, retain_graph=True)
    assert torch.equal(grad, torch.zeros_like(grad))
    per_example.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    only_first = torch.full((2, 1), 5)
    assert torch.equal(losses.causal_lm(torch.randn(2, 1, V), only_first), torch.zeros(2))  # T = 1: no target


def test_causal_lm_mean_matches_hf_only_when_lengths_are_equal():
    torch.manual_seed(2)
    model = _gpt2()
    ids = _ids(2)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    _close(losses.causal_lm(out.logits, ids).mean(), out.loss)  # every sequence has T - 1 targets
    labels = ids.clone()
    labels[0, 2:] = -100
    labels[1, 5:] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    per_example = losses.causal_lm(out.logits, labels)
    assert abs(per_example.mean().item() - out.loss.item()) > 1e-3  # HF weights examples by their token counts
    # HF's batch loss is the token-weighted mean: sum over examples of n_i * mean_i / sum n_i
    counts = (labels[:, 1:] != -100).sum(1).double()
    _close((per_example.double() * counts).sum() / counts.sum(), out.loss)


def test_causal_lm_loss_of_one_example_ignores_the_others():
    torch.manual_seed(3)
    model, batch = _gpt2(), _gpt2_batch()
    with torch.no_grad():
        out = model(**batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0] = _ids(9, (T,))
    changed["labels"][0] = changed["input_ids"][0]
    changed["labels"][0, 2:] = -100  # a different content AND a different number of tokens
    with torch.no_grad():
        out_changed = model(**changed)
    before = losses.causal_lm(out.logits, batch["labels"])
    after = losses.causal_lm(out_changed.logits, changed["labels"])
    assert not torch.allclose(before[0], after[0])
    _close(after[1:], before[1:], atol=1e-6)
    assert not torch.allclose(out.loss, out_changed.loss)  # whereas the batch loss of HF moves for everyone


def test_low_precision_logits_are_computed_in_float32():
    logits = torch.randn(3, 5, V).to(torch.bfloat16)
    labels = _ids(4, (3, 5), low=0)
    labels[0, 3:] = -100
    for fn in (losses.causal_lm, losses.token_classification, losses.seq2seq):
        got = fn(logits, labels)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(logits.float(), labels), atol=0, rtol=0)
    got = losses.classification(logits[:, 0].half(), labels[:, 0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, losses.classification(logits[:, 0].half().float(), labels[:, 0]), atol=0, rtol=0)
    assert losses.causal_lm(logits.double(), labels).dtype == torch.float64


# ---------------------------------------------------------------------------------------------- token classification
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_classification_against_loops(reduction):
    torch.manual_seed(4)
    model = transformers.BertForTokenClassification(_bert_config(num_labels=5)).eval()
    ids = _ids(5)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    labels = _ids(6, low=0) % 5
    labels[mask == 0] = -100
    labels[:, 0] = -100  # [CLS]
    labels[1, 3] = -100  # a sub-word continuation
    labels[3] = -100  # no labelled token at all
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        out = model(**batch)
    got = losses.token_classification(out.logits, labels, reduction=reduction)
    _close(got, ref_token_losses(out.logits, labels, shift=False, reduction=reduction))
    assert got[3] == 0
    if reduction == "mean":
        _close(got[:3], hf_loss_of_each(model, batch)[:3])
    _close(losses.from_hf_output(out, batch, model=model, reduction=reduction), got)
    _close(losses.from_hf_output(out, batch, reduction=reduction), got)  # TokenClassifierOutput decides alone


# ------------------------------------------------------------------------------------------------------- seq2seq
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_seq2seq_t5_against_loops(reduction):
    torch.manual_seed(5)
    model = _t5()
    ids = _ids(7)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    labels = _ids(8, (B, 5))
    labels[1, 2:] = -100
    labels[2, 4:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (B, 5, V)
    got = losses.seq2seq(out.logits, labels, reduction=reduction)
    _close(got, ref_token_losses(out.logits, labels, shift=False, reduction=reduction))
    if reduction == "mean":
        _close(got, hf_loss_of_each(model, batch))
    _close(losses.from_hf_output(out, batch, model=model, reduction=reduction), got)
    _close(losses.from_hf_output(out, batch, reduction=reduction), got)  # Seq2SeqLMOutput decides alone
    assert not torch.allclose(losses.causal_lm(out.logits, labels, reduction=reduction), got)  # shift matters


# ---------------------------------------------------------------------------------------------------- from_hf_output
def test_from_hf_output_causal_lm_from_the_output_class_and_batch_encoding():
    torch.manual_seed(6)
    model = _gpt2()
    batch = transformers.BatchEncoding(_gpt2_batch())
    with torch.no_grad():
        out = model(**batch)
    _close(losses.from_hf_output(out, batch), losses.causal_lm(out.logits, batch["labels"]))


def test_from_hf_output_never_uses_output_loss():
    torch.manual_seed(6)
    model, batch = _gpt2(), _gpt2_batch()
    with torch.no_grad():
        out = model(**batch)
    out.loss = torch.tensor(float("nan"))
    got = losses.from_hf_output(out, batch, model=model)
    assert torch.isfinite(got).all()
    _close(got, losses.causal_lm(out.logits, batch["labels"]))


def test_from_hf_output_ambiguous_shapes_raise():
    logits = torch.randn(B, T, V)
    batch = {"labels": _ids(0)}
    with pytest.raises(ValueError, match=r"Pass `model=` .* or\s+`task=`"):
        losses.from_hf_output({"logits": logits}, batch)

    class CustomHead(nn.Module):  # a model whose class says nothing
        config = transformers.PretrainedConfig()

    with pytest.raises(ValueError, match="CustomHead is not a known head"):
        losses.from_hf_output({"logits": logits}, batch, model=CustomHead())
    for task, fn in (("causal_lm", losses.causal_lm), ("token_classification", losses.token_classification),
                     ("seq2seq", losses.seq2seq)):
        _close(losses.from_hf_output({"logits": logits}, batch, task=task), fn(logits, batch["labels"]))
    # 2-D logits are unambiguous: a classification
    _close(losses.from_hf_output({"logits": logits[:, 0]}, {"labels": batch["labels"][:, 0] % V}),
           losses.classification(logits[:, 0], batch["labels"][:, 0] % V))


def test_from_hf_output_model_class_decides():
    logits = torch.randn(B, T, V)
    batch = {"labels": _ids(0)}
    torch.manual_seed(7)
    gpt2 = _gpt2()
    tagger = transformers.BertForTokenClassification(_bert_config(num_labels=V)).eval()
    t5 = _t5()
    _close(losses.from_hf_output({"logits": logits}, batch, model=gpt2), losses.causal_lm(logits, batch["labels"]))
    _close(losses.from_hf_output({"logits": logits}, batch, model=tagger),
           losses.token_classification(logits, batch["labels"]))
    _close(losses.from_hf_output({"logits": logits}, batch, model=t5), losses.seq2seq(logits, batch["labels"]))


def test_from_hf_output_conflicting_cues_raise():
    torch.manual_seed(8)
    gpt2, batch = _gpt2(), _gpt2_batch()
    tagger = transformers.BertForTokenClassification(_bert_config(num_labels=V)).eval()
    with torch.no_grad():
        out = gpt2(**batch)
    with pytest.raises(ValueError, match="cannot be decided.*BertForTokenClassification.*CausalLMOutput"):
        losses.from_hf_output(out, batch, model=tagger)
    # an explicit task is the user's decision
    _close(losses.from_hf_output(out, batch, model=tagger, task="token_classification"),
           losses.token_classification(out.logits, batch["labels"]))


def test_from_hf_output_decoder_only_conditional_generation_raises():
    class TinyVisionForConditionalGeneration(nn.Module):
        config = transformers.PretrainedConfig(is_encoder_decoder=False)

    with pytest.raises(ValueError, match="decoder-only.*task='causal_lm'"):
        losses.from_hf_output({"logits": torch.randn(B, T, V)}, {"labels": _ids(0)},
                              model=TinyVisionForConditionalGeneration())


def test_from_hf_output_peft_model_is_unwrapped():
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(9)
    peft_model = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert type(peft_model) is PeftModel  # no task_type: the wrapper's class name says nothing
    batch = _gpt2_batch()
    with torch.no_grad():
        out = peft_model(**batch)
    expected = losses.causal_lm(out.logits, batch["labels"])
    _close(losses.from_hf_output({"logits": out.logits}, batch, model=peft_model), expected)
    _close(losses.from_hf_output(out, batch, model=peft_model), expected)
    causal = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                task_type="CAUSAL_LM"))
    _close(losses.from_hf_output({"logits": out.logits}, batch, model=causal), expected)


def test_from_hf_output_input_errors():
    logits = torch.randn(B, 3)
    with pytest.raises(ValueError, match="no 'labels'.*input_ids"):
        losses.from_hf_output({"logits": logits}, {"input_ids": _ids(0)})
    with pytest.raises(ValueError, match="'labels' of type list"):
        losses.from_hf_output({"logits": logits}, {"labels": [0, 1, 2, 0]})
    with pytest.raises(ValueError, match="needs a Mapping"):
        losses.from_hf_output({"logits": logits}, (_ids(0), torch.zeros(B)))
    with pytest.raises(ValueError, match="no `logits`"):
        losses.from_hf_output((torch.tensor(1.0), logits), {"labels": torch.zeros(B, dtype=torch.long)})
    with pytest.raises(ValueError, match="not the LightningModule"):
        losses.from_hf_output({"logits": logits}, {"labels": torch.zeros(B, dtype=torch.long)}, model=nn.Linear(2, 3))
    with pytest.raises(ValueError, match="`task` must be one of"):
        losses.from_hf_output({"logits": logits}, {"labels": torch.zeros(B, dtype=torch.long)}, task="mlm")
    with pytest.raises(ValueError, match="`reduction`"):
        losses.from_hf_output({"logits": logits}, {"labels": torch.zeros(B, dtype=torch.long)}, reduction="none")


# ------------------------------------------------------------------------------------------------ shapes and edges
def test_empty_batch_gives_empty_losses():
    empty = torch.zeros(0, dtype=torch.long)
    for got in (
        losses.classification(torch.randn(0, 3), empty),
        losses.classification(torch.randn(0, 3), torch.zeros(0, 3)),
        losses.classification(torch.randn(0, 1), torch.zeros(0)),
        losses.causal_lm(torch.randn(0, T, V), empty.reshape(0, T)),
        losses.token_classification(torch.randn(0, T, V), empty.reshape(0, T)),
        losses.seq2seq(torch.randn(0, T, V).bfloat16(), empty.reshape(0, T), reduction="sum"),
        losses.from_hf_output({"logits": torch.randn(0, T, V)}, {"labels": empty.reshape(0, T)}, task="causal_lm"),
    ):
        assert got.shape == (0,) and got.dtype == torch.float32


def test_classification_shape_errors():
    logits = torch.randn(B, 3)
    with pytest.raises(PerSampleLossError, match="disagree on the number of examples"):
        losses.classification(logits, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(PerSampleLossError, match="Do not flatten"):
        losses.classification(torch.randn(B, T, 3), torch.zeros(B, dtype=torch.long))
    with pytest.raises(PerSampleLossError, match="Do not flatten"):
        losses.classification(logits, torch.tensor(1))
    with pytest.raises(ValueError, match="floating point"):
        losses.classification(torch.zeros(B, 3, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="`problem_type` must be"):
        losses.classification(logits, torch.zeros(B, dtype=torch.long), problem_type="multiclass")
    with pytest.raises(ValueError, match=r"a class label is 3, outside \[0, 3\)"):
        losses.classification(logits, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="integer class labels"):
        losses.classification(logits, torch.zeros(B), problem_type="single_label_classification")
    with pytest.raises(ValueError, match="same shape"):
        losses.classification(logits, torch.zeros(B, 2))
    with pytest.raises(ValueError, match="labels of the logits' shape"):
        losses.classification(logits, torch.zeros(B), problem_type="regression")
    with pytest.raises(ValueError, match=r"labels \[B\] or \[B, 1\]"):
        losses.classification(logits[:, :1], torch.zeros(B, 2))


@pytest.mark.parametrize("fn", [losses.causal_lm, losses.token_classification, losses.seq2seq])
def test_sequence_shape_errors(fn):
    logits, labels = torch.randn(B, T, V), _ids(0)
    with pytest.raises(PerSampleLossError, match="Do not flatten"):
        fn(logits.reshape(B * T, V), labels.reshape(-1))
    with pytest.raises(PerSampleLossError, match="disagree on the number of examples"):
        fn(logits, _ids(0, (B - 1, T)))
    with pytest.raises(ValueError, match="sequence length"):
        fn(logits, _ids(0, (B, T + 2)))
    with pytest.raises(ValueError, match="integer token/class ids"):
        fn(logits, labels.float())
    with pytest.raises(ValueError, match=rf"a target label is {V}, outside \[0, {V}\)"):
        fn(logits, labels.index_fill(1, torch.tensor([T - 1]), V))
    with pytest.raises(ValueError, match="`reduction`"):
        fn(logits, labels, reduction="none")
    with pytest.raises(ValueError, match="floating point"):
        fn(logits.long(), labels)
    _close(fn(logits, labels.masked_fill(labels > 10, 7), ignore_index=7),
           ref_token_losses(logits, labels.masked_fill(labels > 10, 7), shift=fn is losses.causal_lm,
                            reduction="mean", ignore_index=7))
