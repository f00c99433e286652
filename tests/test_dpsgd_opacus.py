"""BookKeepingDPSGD's clipped sum (σ = 0) against Opacus's per-sample clipping on the same weights and batch.

Opacus reference: ``GradSampleModule`` (hooks mode, ``loss_reduction="sum"``) on a deep copy of the model, the
per-sample gradients ``p.grad_sample`` of one backward of ``Σ_i ℓ_i``, clipped and summed by Opacus's own
``DPOptimizer.clip_and_accumulate`` (flat clipping ``c_i = min(1, C / (||g_i|| + 1e-6))``, noise 0).
A tiny RoBERTa is checked against both Opacus and the per-example autograd loop of ``tests/test_dpsgd_mechanism.py``.

Opacus only captures activations of modules in ``train()`` mode, so models here are in train mode with dropout 0.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_dpsgd_mechanism import check_against_reference, mechanism_sum
from torch import nn

opacus = pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def opacus_clipped_sum(model, loss_fn, clip):
    """Σ_i c_i g_i computed by Opacus (hooks-mode per-sample gradients, ``DPOptimizer.clip_and_accumulate``) as one
    flat float64 vector, and the per-example norms ``||g_i||``."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    try:
        params = [p for p in gsm.parameters() if p.requires_grad]
        opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                          expected_batch_size=None, loss_reduction="sum")
        loss_fn(gsm).sum().backward()
        per_sample = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], 1).double()
        opt.clip_and_accumulate()  # c_i = min(1, C / (||g_i|| + 1e-6)), Σ_i c_i g_i into p.summed_grad
        clipped = torch.cat([p.summed_grad.reshape(-1) for p in params]).double()
    finally:
        gsm._close()
    return clipped, per_sample.norm(dim=1)


def check_against_opacus(model, loss_fn, batch, rtol=1e-5):
    _, norms = opacus_clipped_sum(model, loss_fn, clip=1.0)
    clip = float(norms.median())  # about half of the examples are clipped
    expected, norms = opacus_clipped_sum(model, loss_fn, clip)
    assert (norms > clip).any() and (norms < clip).any()
    flat, params, result = mechanism_sum(model, loss_fn, batch, clip, noise_std=0.0)
    assert flat.numel() == expected.numel() == sum(p.numel() for p in params)
    torch.testing.assert_close(result.sq_norms.double().sqrt(), norms, rtol=rtol * 10, atol=1e-9)
    err = (flat.double() - expected).norm() / expected.norm()
    assert err < rtol, float(err)


def test_mlp_matches_opacus():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(12, 10), torch.randint(0, 4, (12,))
    check_against_opacus(model, lambda m: F.cross_entropy(m(x), y, reduction="none"), 12)


class EmbedLNClassifier(nn.Module):
    """Embedding -> LayerNorm -> Linear on [B, T, d] -> mean over T -> Linear."""

    def __init__(self, vocab=30, d=12, classes=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d)
        self.mid = nn.Linear(d, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, ids):
        h = torch.tanh(self.mid(self.norm(self.emb(ids))))  # [B, T, 16]
        return self.out(h.mean(1))


@pytest.mark.parametrize("seq_len", [5, 40], ids=["gram", "instantiate"])
def test_embedding_layernorm_linear_3d_matches_opacus(seq_len):
    torch.manual_seed(12)
    model = EmbedLNClassifier()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0), so their gradients matter
        model.norm.weight.normal_(1.0, 0.3)
        model.norm.bias.normal_(0.0, 0.3)
    ids = torch.randint(0, 30, (9, seq_len))
    ids[:, 1] = ids[:, 0]  # repeated tokens within an example (the embedding Gram's off-diagonal terms)
    y = torch.randint(0, 3, (9,))
    check_against_opacus(model, lambda m: F.cross_entropy(m(ids), y, reduction="none"), 9)


def _tiny_roberta():
    pytest.importorskip("transformers")
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(13)
    b, t, v = 6, 7, 40
    cfg = RobertaConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=t + 3, type_vocab_size=1, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                        num_labels=3)
    model = RobertaForSequenceClassification(cfg).train()  # dropout 0: train mode is deterministic
    ids = torch.randint(3, v, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 1, 0  # padding (RoBERTa's position ids skip it)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss(m):
        return F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y, reduction="none")

    return model, loss, b


def test_tiny_roberta_matches_opacus():
    model, loss, b = _tiny_roberta()
    check_against_opacus(model, loss, b)


def test_tiny_roberta_against_per_example_loop():
    model, loss, b = _tiny_roberta()
    check_against_reference(model, loss, b)
