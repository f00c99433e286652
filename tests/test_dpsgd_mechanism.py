"""BookKeepingDPSGD against a per-example autograd loop (σ = 0), noise calibration, and noise-once across ranks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dp.mechanisms.collective import Collective, LocalCollective
from lightning_dp.mechanisms.dpsgd import BookKeepingDPSGD, UnsupportedLayerError

CPU = torch.device("cpu")


def mechanism_sum(model, loss_fn, batch, clip, noise_std=0.0, collective=None, mode="bk"):
    """One private sum as the strategy computes it: a checked first step (ordinary backward), then, with σ = 0, a
    second step that stops backward at the hooked outputs (must give the same sum, without autograd's own
    parameter gradients in bk mode)."""
    mech = BookKeepingDPSGD(model, clip, mode=mode)
    try:
        mech.batch_size = batch
        mech.capturing = True
        losses = loss_fn(model)
        mech.capturing = False
        assert losses.shape == (batch,)
        reference = mech.backward(losses, verify=True)
        assert (reference is not None) == (mode == "bk")
        if mode == "bk":
            reference = {k: v.clone() for k, v in reference.items()}
            mech.clear_grads()
        flat, result = mech.private_sum(batch, noise_std, collective or LocalCollective(), CPU, reference)
        if noise_std == 0:
            mech.batch_size = batch
            mech.capturing = True
            losses = loss_fn(model)
            mech.capturing = False
            assert mech.backward(losses, verify=False) is None
            if mode == "bk":
                assert all(p.grad is None for p in mech.params)
            again, _ = mech.private_sum(batch, 0.0, collective or LocalCollective(), CPU)
            torch.testing.assert_close(again, flat, rtol=1e-6, atol=1e-7)
            assert all(p.grad is None for p in mech.params)
    finally:
        mech.remove_hooks()
    return flat, mech.params, result


def reference_grads(model, loss_fn, params):
    """Per-example full flat gradients [B, P] by one backward per example."""
    losses = loss_fn(model)
    rows = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows).double()


def check_against_reference(model, loss_fn, batch, rtol=1e-5):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    per_ex = reference_grads(model, loss_fn, params)
    norms = per_ex.norm(dim=1)
    clip = float(norms.median())  # about half of the examples are clipped
    c = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (c < 1).any() and (c == 1).any()
    expected = (c[:, None] * per_ex).sum(0)
    for mode in ("bk", "ghost"):
        flat, mech_params, result = mechanism_sum(model, loss_fn, batch, clip, mode=mode)
        assert [id(p) for p in mech_params] == [id(p) for p in params]
        torch.testing.assert_close(result.sq_norms.double(), norms.square(), rtol=rtol * 10, atol=1e-9)
        err = (flat.double() - expected).norm() / expected.norm()
        assert err < rtol, (mode, float(err))
    return result


def ce(model_fn, y):
    return lambda m: F.cross_entropy(model_fn(m), y, reduction="none")


def test_mlp_linear_2d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    check_against_reference(model, ce(lambda m: m(x), y), 10)


@pytest.mark.parametrize("t, d, p", [(3, 8, 6), (10, 2, 3)], ids=["gram", "instantiate"])
def test_linear_3d_both_branches(t, d, p):
    assert (t * t <= p * d) == (t == 3)  # the branch factor_sq_norms takes
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(d, p), nn.Tanh(), nn.Linear(p, 2))
    x, y = torch.randn(7, t, d), torch.randint(0, 2, (7,))
    check_against_reference(model, ce(lambda m: m(x).mean(1), y), 7)


def test_embedding_with_padding_idx():
    torch.manual_seed(3)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, padding_idx=0)
            self.out = nn.Linear(4, 3)

        def forward(self, ids):
            return self.out(self.emb(ids).sum(1))

    model = M()
    ids = torch.randint(0, 10, (8, 6))
    ids[:, :2] = 0  # padding
    ids[:, 2] = ids[:, 3]  # repeated tokens within an example
    y = torch.randint(0, 3, (8,))
    check_against_reference(model, ce(lambda m: m(ids), y), 8)
    # the padding row gets no gradient
    flat, params, _ = mechanism_sum(model, ce(lambda m: m(ids), y), 8, clip=1.0)
    assert torch.all(flat[: 10 * 4].view(10, 4)[0] == 0)


def test_added_embeddings_share_one_gram_and_stay_exact(monkeypatch):
    """BERT-style embeddings (word + position + token type, added) receive one output gradient: its Gram matrix is
    formed once (in panels: T = 80) and each embedding's norm masks it with its own token matches."""
    import lightning_dp.mechanisms.dpsgd as dpsgd

    torch.manual_seed(5)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(20, 6, padding_idx=0)
            self.pos = nn.Embedding(80, 6)
            self.kind = nn.Embedding(2, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, ids, kinds):
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            return self.out(torch.tanh(self.word(ids) + self.pos(positions) + self.kind(kinds)).mean(1))

    ids, kinds = torch.randint(0, 20, (7, 80)), torch.randint(0, 2, (7, 80))
    ids[:, -5:] = 0
    y = torch.randint(0, 3, (7,))
    model, loss = M(), ce(lambda m: m(ids, kinds), y)
    check_against_reference(model, loss, 7)
    calls, gram = [], dpsgd.gram
    monkeypatch.setattr(dpsgd, "gram", lambda x: calls.append(tuple(x.shape)) or gram(x))
    mechanism_sum(model, loss, 7, clip=1.0)  # bk: the checked step and a step stopped at the outputs
    assert calls == [(7, 80, 6)] * 2  # one Gram per step for the three embeddings


def test_layernorm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    x, y = torch.randn(9, 5, 4), torch.randint(0, 2, (9,))
    check_against_reference(model, ce(lambda m: m(x).mean(1), y), 9)


def test_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5))
    with torch.no_grad():
        for m in model:
            if isinstance(m, Conv1D):
                m.bias.normal_()
    x, y = torch.randn(6, 4, 4), torch.randint(0, 3, (6,))
    check_against_reference(model, ce(lambda m: m(x).mean(1), y), 6)
    x2 = torch.randn(6, 4)
    check_against_reference(model, ce(lambda m: m(x2), y), 6)


def test_tied_embedding_and_output_projection():
    torch.manual_seed(6)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 5)
            self.mid = nn.Linear(5, 5)
            self.head = nn.Linear(5, 12, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    model = TiedLM()
    ids = torch.randint(0, 12, (6, 7))

    def loss(m):
        logits = m(ids[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    check_against_reference(model, loss, 6)


def test_module_called_twice():
    torch.manual_seed(7)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.lin(torch.tanh(self.lin(x))))

    model = Twice()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    check_against_reference(model, ce(lambda m: m(x), y), 8)


def test_frozen_parameters_are_not_hooked():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    mech = BookKeepingDPSGD(model, 1.0)
    assert len(mech._handles) == 1 and mech.numel == 10
    mech.remove_hooks()


@pytest.mark.parametrize("frozen", [False, True])
def test_batchnorm_is_a_clear_error(frozen):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].requires_grad_(not frozen)
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d mixes the examples"):
        BookKeepingDPSGD(model, 1.0)


def test_unsupported_layer_is_one_clear_error():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 2), Scale())
    with pytest.raises(UnsupportedLayerError, match=r"1 \(Scale\), 3 \(Scale\)"):
        BookKeepingDPSGD(model, 1.0)


def test_opacus_sampler_is_used_for_other_layers():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 2))
    x, y = torch.randn(7, 2, 8), torch.randint(0, 2, (7,))
    check_against_reference(model, ce(lambda m: m(x), y), 7)


def test_batch_first_violation_is_an_error():
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(5, 3, 4)  # seq-first: [T, B, d] with T != B

    with pytest.raises(RuntimeError, match="batch-first"):
        mechanism_sum(model, lambda m: m(x).pow(2).sum((0, 2)), 3, clip=1.0)


# ---------------------------------------------------------------------------------------------- noise


class FakeRank(Collective):
    def __init__(self, rank):
        self.rank, self.world_size = rank, 2

    def all_reduce_sum(self, tensor):
        return tensor


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("empty", [True, False])
def test_noise_std_is_sigma_c(empty, mode):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(60, 50), nn.Tanh(), nn.Linear(50, 40))
    x = torch.randn(4, 60)
    loss = lambda m: m(x).pow(2).mean(1)  # noqa: E731
    clean, _, _ = mechanism_sum(model, loss, 4, clip=0.5, mode=mode)
    std = 0.7 * 0.5
    if empty:
        mech = BookKeepingDPSGD(model, 0.5, mode=mode)
        noisy, _ = mech.private_sum(0, std, LocalCollective(), CPU)
        mech.remove_hooks()
        noise = noisy
    else:
        noisy, _, _ = mechanism_sum(model, loss, 4, clip=0.5, noise_std=std, mode=mode)
        noise = noisy - clean
    n = noise.numel()  # 5090 coordinates: the std estimate is within ~1%
    assert n > 5000
    est = noise.double().std().item()
    assert abs(noise.double().mean().item()) < 5 * std / math.sqrt(n)
    assert 0.95 * std < est < 1.05 * std, est  # 2x or 0.5x fails


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_noise_added_on_rank_zero_only(mode):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(4, 6)
    loss = lambda m: m(x).pow(2).mean(1)  # noqa: E731
    clean, _, _ = mechanism_sum(model, loss, 4, clip=0.5, mode=mode)
    r1, _, _ = mechanism_sum(model, loss, 4, clip=0.5, noise_std=1.0, collective=FakeRank(1), mode=mode)
    r0, _, _ = mechanism_sum(model, loss, 4, clip=0.5, noise_std=1.0, collective=FakeRank(0), mode=mode)
    torch.testing.assert_close(r1, clean)
    assert (r0 - clean).abs().max() > 0.1
    # noise seeds come from OS entropy: the global RNG is untouched and two draws differ
    state = torch.get_rng_state()
    a, _, _ = mechanism_sum(model, loss, 4, clip=0.5, noise_std=1.0, mode=mode)
    b, _, _ = mechanism_sum(model, loss, 4, clip=0.5, noise_std=1.0, mode=mode)
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, b)


def test_singly_used_weights_are_never_instantiated(monkeypatch):
    """Linear/Conv1D/Embedding weights used once get ghost norms and book-kept sums: no [B, p, d] tensor."""
    from transformers.pytorch_utils import Conv1D

    instantiated = []
    original = BookKeepingDPSGD._dense

    def spy(self, kind, module, use, p):
        instantiated.append((type(module).__name__, p is getattr(module, "weight", None)))
        return original(self, kind, module, use, p)

    monkeypatch.setattr(BookKeepingDPSGD, "_dense", spy)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = Conv1D(6, 4)
            self.ln = nn.LayerNorm(6)
            self.out = nn.Linear(6, 2)

        def forward(self, ids):
            return self.out(self.ln(self.conv(self.emb(ids))).mean(1))

    torch.manual_seed(11)
    ids, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 2, (5,))
    check_against_reference(M(), ce(lambda m: m(ids), y), 5)
    weights = {name for name, is_weight in instantiated if is_weight}
    assert weights == {"LayerNorm"}, instantiated
    assert {name for name, _ in instantiated} == {"Conv1D", "LayerNorm", "Linear"}  # biases only


def _captured_losses(mech, model, x, y):
    mech.batch_size = x.shape[0]
    mech.capturing = True
    try:
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)
    finally:
        mech.capturing = False


def test_bk_frees_what_the_clipped_sum_does_not_need():
    """bk: the output-gradient hook forms a LayerNorm's per-example gradients ([B, d], smaller than its stored input
    and output gradient) at once and frees both; a linear weight keeps its factors for book-keeping; the check's
    reference gradients are consumed (freed) before the flat buffer is allocated; the sum stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5, 4))
    mech = BookKeepingDPSGD(model, clip=0.5)
    reference = mech.backward(_captured_losses(mech, model, x, y), verify=True)
    mech.clear_grads()
    (norm_use,) = mech._uses[id(model[1])]
    assert norm_use.a == () and norm_use.g is None
    assert set(norm_use.dense) == {id(model[1].weight), id(model[1].bias)}
    (linear_use,) = mech._uses[id(model[2])]
    assert linear_use.g is not None and linear_use.dense is None
    flat, result = mech.private_sum(5, 0.0, LocalCollective(), CPU, reference)
    assert reference == {} and result.verified
    expected = reference_grads(model, lambda m: F.cross_entropy(m(x).transpose(1, 2), y, reduction="none").mean(1),
                               mech.params)
    c = (0.5 / (expected.norm(dim=1) + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(flat.double(), (c[:, None] * expected).sum(0), rtol=1e-5, atol=1e-7)
    mech.remove_hooks()


def test_parameter_that_no_example_reached_gets_exactly_zero():
    """The flat buffer is not zero-filled up front: the slice of a parameter whose module's output did not reach the
    loss must still be written as exactly 0 (here on memory that held other values just before)."""
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    mech = BookKeepingDPSGD(model, clip=1.0)
    x, y = torch.randn(6, 2, 4), torch.randint(0, 3, (6, 2))
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):
        losses = _captured_losses(mech, model, x, y)
        reference = mech.backward(losses, verify=step == 0)
        mech.clear_grads()
        garbage = torch.full((mech.numel,), 7.0)  # freed right before the flat buffer is allocated
        del garbage
        flat, _ = mech.private_sum(6, 0.0, LocalCollective(), CPU, reference)
        mech.write_grads(flat, 1.0)
        for name, p in zip(names, mech.params):
            if name.startswith("unused"):
                assert torch.equal(p.grad, torch.zeros_like(p))
            else:
                assert p.grad.abs().sum() > 0
        mech.clear_grads()
    mech.remove_hooks()
