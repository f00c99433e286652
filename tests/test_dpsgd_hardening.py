"""DP-SGD release hardening (both clipping modes, σ = 0):

* an example whose per-example norm is not finite (NaN/inf loss or input) gets clip factor 0 and contributes exactly
  nothing: the release equals the release of the batch without it, and a verify step on non-finite values reports
  ``verified=False`` instead of passing silently;
* ghost mode's second backward stops at the hooked outputs: the release is the hook-decomposed clipped sum, never
  autograd's ``.grad`` (a weight also used outside its module after the verified step adds nothing unclipped).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from custom_kernels.clip_noise import clip_coefficients
from lightning_dp.mechanisms.collective import LocalCollective
from lightning_dp.mechanisms.dpsgd import BookKeepingDPSGD

CPU = torch.device("cpu")
MODES = ["bk", "ghost"]


def step(mech, loss_fn, batch, verify, noise_std=0.0):
    """One step as the strategy runs it: capture the forward, backward(losses, verify), private_sum."""
    mech.reset()
    mech.batch_size = batch
    mech.capturing = True
    try:
        losses = loss_fn()
    finally:
        mech.capturing = False
    reference = mech.backward(losses, verify=verify)
    if reference is not None:
        reference = {k: v.clone() for k, v in reference.items()}
        mech.clear_grads()
    flat, result = mech.private_sum(batch, noise_std, LocalCollective(), CPU, reference_grads=reference)
    return flat.clone(), result


def assert_rel_close(got, expected, rtol=1e-5):
    err = float((got.double() - expected.double()).norm() / expected.double().norm())
    assert err < rtol, err


def per_example_grads(loss_fn, params):
    """[B, P] per-example gradients, one autograd backward per example (float64)."""
    losses = loss_fn()
    rows = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows).double()


# ---------------------------------------------------------------------------------------------- models


class Mixed(nn.Module):
    """Embedding (with padding) + Linear (+ bias) + LayerNorm on token ids and float features."""

    def __init__(self, tied=False):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.proj = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11 if tied else 4, bias=not tied)
        if tied:  # GPT-2 style: the output projection is the embedding (two uses, instantiated per-example grads)
            self.head.weight = self.emb.weight
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.bias.normal_()

    def forward(self, ids, x):
        return self.head(torch.tanh(self.ln(self.emb(ids) + self.proj(x)))).mean(1)


def mixed_batch(b=6, t=5, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 11, (b, t), generator=g)
    ids[:, 0] = 0  # padding
    ids[:, 1] = ids[:, 2]  # a repeated token
    x = torch.randn(b, t, 3, generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    return ids, x, y


def mixed_loss(model, ids, x, y, scale=None):
    def loss():
        losses = F.cross_entropy(model(ids, x), y, reduction="none")
        return losses if scale is None else losses * scale

    return loss


def poisoned(kind, ids, x, y, k):
    """The batch with example ``k`` made non-finite, and the per-example loss scale (``None``: no scaling)."""
    x = x.clone()
    scale = None
    if kind == "input_nan":
        x[k, 2, 1] = float("nan")
    elif kind == "input_inf":
        x[k, 0, 0] = float("inf")
    else:
        scale = torch.ones(x.shape[0])
        scale[k] = float("nan") if kind == "loss_nan" else float("inf")
    return ids, x, y, scale


# ---------------------------------------------------------------------------------------------- 1. non-finite examples


def test_clip_coefficients_map_nonfinite_norms_to_zero():
    sq = torch.tensor([0.25, 4.0, float("nan"), float("inf"), 1e30])
    c = clip_coefficients(sq, max_norm=1.0)
    assert torch.isfinite(c).all()
    assert c[2].item() == 0.0 and c[3].item() == 0.0
    assert c[0].item() == 1.0 and abs(c[1].item() - 0.5) < 1e-5 and 0 < c[4].item() < 1e-14


@pytest.mark.parametrize("tied", [False, True], ids=["mixed", "tied"])
@pytest.mark.parametrize("kind", ["input_nan", "input_inf", "loss_nan", "loss_inf"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_example_contributes_exactly_nothing(mode, kind, tied):
    """With one poisoned example, the release (verify step and later steps) equals the release of the batch
    without it; the example gets factor 0, is counted in `nonfinite`, and the verify step reports verified=False."""
    torch.manual_seed(0)
    model = Mixed(tied=tied)
    ids, x, y = mixed_batch(classes=11 if tied else 4)
    k, b = 2, ids.shape[0]
    keep = [i for i in range(b) if i != k]
    clean_loss = mixed_loss(model, ids[keep], x[keep], y[keep])
    clip = float(per_example_grads(clean_loss, list(model.parameters())).norm(dim=1).median())
    mech = BookKeepingDPSGD(model, clip, mode=mode)
    try:
        clean, clean_result = step(mech, clean_loss, b - 1, verify=True)
        assert clean_result.verified and clean_result.nonfinite == 0
        assert 0 < clean_result.clipped_fraction < 1  # some examples are clipped, some not
        p_ids, p_x, p_y, scale = poisoned(kind, ids, x, y, k)
        loss = mixed_loss(model, p_ids, p_x, p_y, scale)
        for verify in (True, False):
            flat, result = step(mech, loss, b, verify=verify)
            assert torch.isfinite(flat).all()
            assert result.nonfinite == 1 and result.verified is False
            assert_rel_close(flat, clean)
            assert all(p.grad is None for p in mech.params)
        # a later clean verify step passes again
        _, result = step(mech, mixed_loss(model, ids, x, y), b, verify=True)
        assert result.verified and result.nonfinite == 0
    finally:
        mech.remove_hooks()


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_verify_step_does_not_pass_a_parameter_used_outside_its_module(mode):
    """On a verify step with a NaN example, the hooks-vs-autograd comparison cannot be made: it must not pass
    silently (NaN > tol is False) but report verified=False; the next finite verify step catches the misuse."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return self.out(h) + F.linear(h, self.out.weight)  # second use bypasses the module's hooks

    torch.manual_seed(1)
    model = Functional()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    bad = x.clone()
    bad[3, 1] = float("nan")
    mech = BookKeepingDPSGD(model, 1.0, mode=mode)
    try:
        flat, result = step(mech, lambda: F.cross_entropy(model(bad), y, reduction="none"), 5, verify=True)
        assert result.verified is False and result.nonfinite == 1
        assert torch.isfinite(flat).all()
        with pytest.raises(RuntimeError, match=r"'out.weight'.*used outside the module"):
            step(mech, lambda: F.cross_entropy(model(x), y, reduction="none"), 5, verify=True)
    finally:
        mech.remove_hooks()


# ---------------------------------------------------------------------------------------------- 2. ghost second pass


class Routed(nn.Module):
    """``fc.weight`` is also used outside ``fc`` (``F.linear``) when ``route`` is set: data-dependent routing that
    the first-step check cannot see. ``route="detached"`` is the same forward with that use's weight a constant:
    its per-example gradients are what the hooks decompose."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.route = "off"

    def forward(self, ids):
        h = torch.tanh(self.fc(self.ln(self.emb(ids))))
        if self.route == "on":
            h = h + F.linear(h, self.fc.weight)
        elif self.route == "detached":
            h = h + F.linear(h, self.fc.weight.detach())
        return self.head(h).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_release_is_only_the_hook_decomposed_clipped_sum(mode):
    torch.manual_seed(2)
    model = Routed()
    ids, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 3, (6,))
    loss = lambda: F.cross_entropy(model(ids), y, reduction="none")  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    model.route = "detached"
    hooked = per_example_grads(loss, params)
    norms = hooked.norm(dim=1)
    clip = float(norms.median())
    c = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (c < 1).any() and (c == 1).any()
    expected = (c[:, None] * hooked).sum(0)
    # what an unclipped leak would add: the functional use's gradient, with the same factors
    model.route = "on"
    leaky = (c[:, None] * per_example_grads(loss, params)).sum(0)
    assert (leaky - expected).norm() > 0.05 * expected.norm()

    mech = BookKeepingDPSGD(model, clip, mode=mode)
    try:
        model.route = "off"
        _, result = step(mech, loss, 6, verify=True)  # the first step is checked, without the routed use
        assert result.verified
        model.route = "on"  # from step 2 on, fc.weight is also used outside fc
        for _ in range(2):
            flat, result = step(mech, loss, 6, verify=False)
            assert not result.verified
            torch.testing.assert_close(result.sq_norms.double(), norms.square(), rtol=1e-4, atol=1e-9)
            assert_rel_close(flat, expected)
    finally:
        mech.remove_hooks()


@pytest.mark.parametrize("mode", MODES)
def test_unverified_steps_never_compute_autograd_weight_gradients(mode):
    """After the verify step, no backward (ghost: neither the norm pass nor the clipped-sum pass) computes a
    parameter's gradient, and `.grad` stays None."""
    torch.manual_seed(3)
    model = Mixed(tied=True)
    ids, x, y = mixed_batch(classes=11)
    calls = []
    handles = [p.register_hook(lambda g, n=n: calls.append(n)) for n, p in model.named_parameters()]
    mech = BookKeepingDPSGD(model, 0.5, mode=mode)
    try:
        step(mech, mixed_loss(model, ids, x, y), 6, verify=True)
        assert calls  # the verify step runs an ordinary backward
        calls.clear()
        flat, _ = step(mech, mixed_loss(model, ids, x, y), 6, verify=False)
        assert calls == []
        assert all(p.grad is None for p in mech.params)
        assert flat.abs().sum() > 0
    finally:
        mech.remove_hooks()
        for h in handles:
            h.remove()


@pytest.mark.parametrize("tied", [False, True], ids=["mixed", "tied"])
def test_bk_and_ghost_release_the_same_sum_over_steps(tied):
    """Same releases from both modes on the verify step, later steps and a step with a non-finite example."""
    torch.manual_seed(4)
    model = Mixed(tied=tied)
    batches = [mixed_batch(seed=s, classes=11 if tied else 4) for s in range(3)]
    batches.append(poisoned("input_nan", *batches[0], k=4))
    clip = float(per_example_grads(mixed_loss(model, *batches[0]), list(model.parameters())).norm(dim=1).median())
    released = {}
    for mode in MODES:
        mech = BookKeepingDPSGD(model, clip, mode=mode)
        try:
            released[mode] = [
                step(mech, mixed_loss(model, *batch[:3], *batch[3:]), 6, verify=i == 0)
                for i, batch in enumerate(batches)
            ]
        finally:
            mech.remove_hooks()
    for (bk, rb), (gh, rg) in zip(released["bk"], released["ghost"]):
        assert_rel_close(gh, bk)
        torch.testing.assert_close(rg.sq_norms, rb.sq_norms, rtol=1e-5, atol=1e-9, equal_nan=True)
        assert (rg.nonfinite, rg.verified, rg.clipped_fraction) == (rb.nonfinite, rb.verified, rb.clipped_fraction)
    assert released["bk"][0][1].verified and released["bk"][-1][1].nonfinite == 1
