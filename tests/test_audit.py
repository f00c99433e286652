"""The one-run privacy audit: the Steinke–Nasr–Jagielski bound itself, the guesses, the secret coins, and audits
of the real strategies (power without noise, soundness at the claimed ε, canaries through Poisson sampling)."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.audit import (
    DiracCanaryModule,
    audit_from_scores,
    epsilon_lower_bound,
    guess_from_scores,
    p_value,
)
from lightning_dp.callbacks.audit import CanaryAudit
from lightning_dp.errors import ConfigurationError
from lightning_dp.privacy.sampling import PoissonBatchSampler
from lightning_dp.strategies.dpsgd import DPSGDStrategy
from lightning_dp.strategies.dpzero import DPZeroStrategy
from tests.helpers import trainer_kwargs


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------ the bound itself
@pytest.mark.parametrize("r,v,eps", [(10, 7, 0.3), (100, 80, 1.0), (250, 240, 2.5), (40, 0, 0.0), (57, 57, 4.0)])
def test_p_value_with_delta_zero_is_the_binomial_tail(r, v, eps):
    assert p_value(500, r, v, eps, 0.0) == pytest.approx(binom.sf(v - 1, r, _expit(eps)), rel=1e-12, abs=1e-300)


def test_p_value_delta_term_matches_a_direct_evaluation():
    m, r, v, eps, delta = 1000, 200, 150, 1.2, 1e-4
    q = _expit(eps)
    pmf = [binom.pmf(j, r, q) for j in range(v)]
    alpha = 0.0
    for i in range(1, v + 1):  # max_i (1/i) P[v - i <= Binomial(r, q) < v], summed term by term
        alpha = max(alpha, sum(pmf[v - i : v]) / i)
    expected = binom.sf(v - 1, r, q) + 2 * m * delta * alpha
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)


@pytest.mark.parametrize("r,v", [(100, 70), (100, 90), (500, 300), (30, 30)])
def test_epsilon_lower_bound_with_delta_zero_solves_the_binomial_tail(r, v):
    beta = 0.05
    # independently: the ε where P[Binomial(r, e^ε/(1+e^ε)) >= v] = β, by scipy's root finder
    expected = brentq(lambda e: binom.sf(v - 1, r, _expit(e)) - beta, 0.0, 50.0, xtol=1e-10)
    assert epsilon_lower_bound(r, r, v, 0.0, beta) == pytest.approx(expected, abs=1e-5)


def test_all_correct_guesses_closed_form():
    # v = r, δ = 0: p_ε^r = β, so ε = log(p / (1 - p)) with p = β^(1/r)
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_bound_is_zero_at_chance_and_monotone_in_correct_guesses():
    m, r, delta = 1000, 200, 1e-6
    assert epsilon_lower_bound(m, r, r // 2, delta) == 0.0
    assert epsilon_lower_bound(m, r, 108, delta) == 0.0  # above chance but not significant at 95%
    bounds = [epsilon_lower_bound(m, r, v, delta) for v in range(100, r + 1, 5)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[-1] > 3.0


def test_bound_decreases_with_delta_and_confidence():
    m, r, v = 1000, 200, 180
    by_delta = [epsilon_lower_bound(m, r, v, d) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert all(b2 < b1 for b1, b2 in zip(by_delta, by_delta[1:]))
    assert epsilon_lower_bound(m, r, v, 1e-6, beta=0.01) < epsilon_lower_bound(m, r, v, 1e-6, beta=0.05)


def test_bound_rejects_invalid_counts():
    with pytest.raises(ValueError, match="v <= r <= m"):
        epsilon_lower_bound(10, 5, 6, 0.0)
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 11, 3, 1.0, 0.0)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(10, 5, 5, 0.0, beta=1.0)


# ------------------------------------------------------------------------------------------ guesses
def test_guesses_take_top_and_bottom_scores_with_index_ties():
    scores = torch.tensor([0.5, 3.0, -1.0, 0.0, 0.0, 2.0])
    assert guess_from_scores(scores, 2, 2).tolist() == [0, 1, -1, 0, -1, 1]
    # ties broken by index (stable): of the zeros at indices 3 and 4, the later one is the lowest
    assert guess_from_scores(scores, 0, 2).tolist() == [0, 0, -1, 0, -1, 0]
    with pytest.raises(ValueError):
        guess_from_scores(scores, 4, 3)


def test_audit_from_scores_counts_and_bonferroni():
    g = torch.Generator().manual_seed(0)
    included = torch.rand(400, generator=g) < 0.5
    scores = included.double() + 0.8 * torch.randn(400, generator=g, dtype=torch.float64)
    single = audit_from_scores(scores, included, 1e-6, num_guesses=100)
    guesses = guess_from_scores(scores, 50, 50)
    v = int(((guesses == 1) & included).sum() + ((guesses == -1) & ~included).sum())
    assert (single.r, single.v, single.k_pos, single.k_neg) == (100, v, 50, 50)
    assert single.epsilon_lb == pytest.approx(epsilon_lower_bound(400, 100, v, 1e-6, 0.05), abs=1e-9)
    several = audit_from_scores(scores, included, 1e-6, num_guesses=[20, 100, 400])
    expected = max(epsilon_lower_bound(400, r, vr, 1e-6, 0.05 / 3) for r, vr in
                   [(r, _correct(scores, included, r)) for r in (20, 100, 400)])
    assert several.epsilon_lb == pytest.approx(expected, abs=1e-9)
    assert several.candidates == (20, 100, 400)
    # scores independent of the coins: no ε is rejected
    noise = torch.randn(400, generator=g, dtype=torch.float64)
    assert audit_from_scores(noise, included, 1e-6).epsilon_lb < 0.5


def _correct(scores, included, r):
    guesses = guess_from_scores(scores, (r + 1) // 2, r // 2)
    return int(((guesses == 1) & included).sum() + ((guesses == -1) & ~included).sum())


# ------------------------------------------------------------------------------------------ the callback
def test_coins_are_secret_and_fair_and_attach_inserts_exactly_the_included():
    canaries = TensorDataset(torch.arange(2000))
    a, b = CanaryAudit(canaries), CanaryAudit(canaries)
    assert not torch.equal(a._included, b._included)  # OS entropy: two audits draw different coins
    assert 900 < int(a._included.sum()) < 1100  # Binomial(2000, ½): ±4.5 standard deviations
    seeded = CanaryAudit(canaries, seed=3)
    train = seeded.attach(TensorDataset(torch.arange(5) - 10))
    members = [int(train[i][0]) for i in range(len(train))]
    assert members[:5] == [-10, -9, -8, -7, -6]
    assert members[5:] == seeded._included.nonzero().flatten().tolist()
    with pytest.raises(ConfigurationError, match="already"):
        seeded.attach(TensorDataset(torch.arange(5)))


def test_fit_without_attach_is_an_error():
    audit = CanaryAudit(TensorDataset(torch.arange(10)))
    trainer = L.Trainer(**trainer_kwargs(max_steps=1), callbacks=[audit])
    with pytest.raises(ConfigurationError, match="attach"):
        trainer.fit(DiracCanaryModule(10), DataLoader(TensorDataset(torch.arange(10)), batch_size=2))


def _dirac_audit(strategy, m=200, background=100, batch_size=50, steps=100, lr=0.1, callbacks=(), **audit_kw):
    audit = CanaryAudit(TensorDataset(torch.arange(background, background + m)), seed=1, **audit_kw)
    train = audit.attach(TensorDataset(torch.arange(background)))
    model = DiracCanaryModule(background + m, scale=100.0, lr=lr)
    trainer = L.Trainer(**trainer_kwargs(max_steps=steps), strategy=strategy, callbacks=[audit, *callbacks])
    trainer.fit(model, DataLoader(train, batch_size=batch_size))
    return audit, trainer, model


# ------------------------------------------------------------------------------------------ audits of real runs
def test_dpsgd_canaries_go_through_poisson_sampling_and_clipping():
    """σ = 0: each included canary's score is exactly scale·lr·C·n_k/(q·N), n_k = the number of steps whose Poisson
    sample (the strategy's sampler, same seed) held it; excluded canaries never move."""
    clip, lr, steps = 1.0, 0.1, 40
    audit, trainer, _ = _dirac_audit(
        DPSGDStrategy(noise_multiplier=0.0, delta=1e-5, clip=clip, sampling_seed=7), steps=steps, lr=lr
    )
    strategy = trainer.strategy
    n, q = strategy.dataset_size, strategy.sample_rate
    sampler = PoissonBatchSampler(n, q, 1, seed=strategy.sampling_seed)
    counts = torch.zeros(n)
    for step in range(steps):
        counts[sampler.global_indices(step)] += 1
    included = audit.included
    expected = torch.zeros(audit.m, dtype=torch.float64)
    expected[included] = (100.0 * lr * clip / (q * n)) * counts[100:].double()  # the canaries follow 100 others
    torch.testing.assert_close(audit.scores, expected, rtol=1e-5, atol=1e-6)
    assert counts[100:].sum() > 0 and (audit.scores[~included] == 0).all()


def test_dpsgd_without_noise_the_audit_has_power():
    audit, _, _ = _dirac_audit(DPSGDStrategy(noise_multiplier=0.0, delta=1e-5, clip=1.0))
    result = audit.result
    assert result.epsilon_claimed == math.inf
    assert result.epsilon_lb > 2.0, result  # a run claiming ε ≤ 2 without noise is caught


def test_dpsgd_at_claimed_epsilon_the_audit_is_sound():
    audit, trainer, _ = _dirac_audit(DPSGDStrategy(eps=1.0, delta=1e-5, clip=1.0, accountant="rdp"))
    result = audit.result
    assert result.epsilon_claimed == pytest.approx(trainer.strategy.privacy_report()["epsilon"])
    assert result.epsilon_claimed <= 1.0 + 1e-6
    assert 0.0 <= result.epsilon_lb <= result.epsilon_claimed, result


def test_dpzero_without_noise_the_audit_has_power_and_at_claimed_epsilon_is_sound():
    # full-batch Poisson sampling (q = 1): the zeroth-order signal of a canary grows like sqrt(steps · q / N)
    kw = dict(background=0, batch_size=200, steps=200, lr=0.01)
    free, _, _ = _dirac_audit(DPZeroStrategy(noise_multiplier=0.0, delta=1e-5, clip=1.0, seed=0), **kw)
    assert free.result.epsilon_lb > 0.5, free.result
    private, _, _ = _dirac_audit(DPZeroStrategy(eps=2.0, delta=1e-5, clip=1.0, seed=0, accountant="rdp"), **kw)
    assert 0.0 <= private.result.epsilon_lb <= private.result.epsilon_claimed <= 2.0 + 1e-6, private.result


def test_non_private_run_needs_delta_and_reports_no_claim():
    audit = CanaryAudit(TensorDataset(torch.arange(100, 300)), seed=2, delta=1e-5, num_guesses=100,
                        loss_fn=lambda module, batch: module.inner(batch[0]))
    train = audit.attach(TensorDataset(torch.arange(100)))
    trainer = L.Trainer(**trainer_kwargs(max_steps=30), callbacks=[audit])
    trainer.fit(_MeanLoss(DiracCanaryModule(300, scale=1.0, lr=0.1)), DataLoader(train, batch_size=50, shuffle=True))
    assert audit.result.epsilon_claimed is None and audit.result.epsilon_lb > 2.0


class _MeanLoss(L.LightningModule):
    """Non-private Lightning training needs a scalar loss; the audit still reads per-example losses."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx).mean()

    def configure_optimizers(self):
        return self.inner.configure_optimizers()
