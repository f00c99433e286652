"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv 2305.08846).

The experiment: ``m`` canaries, each included in the training set independently with probability ½ (a secret coin
``S_i``). After training, an auditor looks at the trained model only, ranks the canaries by a membership score,
and guesses "included" for the ``k+`` highest scores, "excluded" for the ``k-`` lowest, and abstains on the rest:
``r = k+ + k-`` guesses, ``v`` of them correct.

The bound (the paper's Theorem 5.2 and the algorithm of its Appendix D, re-implemented here): if training is
(ε, δ)-DP, then for every ``v``

    P[W ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2mδ · max_{i=1..v} (1/i) · P[v − i ≤ Binomial(r, p_ε) < v],

with ``p_ε = e^ε / (1 + e^ε)`` (the accuracy of ε-DP randomized response) and ``W`` the number of correct guesses.
The right-hand side is the *p-value* of observing ``v`` correct guesses under the hypothesis "(ε, δ)-DP";
:func:`epsilon_lower_bound` returns the supremum of the ε whose p-value is below ``β`` (found by bisection: the
p-value increases with ε), so "training is (ε, δ)-DP" is rejected at confidence ``1 − β`` for every smaller ε. With
δ = 0 the p-value is exactly the Binomial tail.

What it costs and what it says: the bound needs no retraining (one run, ``m`` canaries), and it is a *lower* bound:
a sound implementation never gives ε_lb above the claimed ε except with probability ``β``; ε_lb far below the
claimed ε is expected (one run, a last-iterate or loss-based auditor, and ``r`` guesses cap ε_lb near
``log(r)``), and does not show that the claimed ε is loose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

__all__ = [
    "AuditResult",
    "DiracCanaryModule",
    "audit_from_scores",
    "epsilon_lower_bound",
    "guess_from_scores",
    "p_value",
]


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, int) and isinstance(r, int) and isinstance(v, int)):
        raise TypeError(f"m, r, v must be integers, got m={m!r}, r={r!r}, v={v!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct guesses <= guesses <= canaries), got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on the probability that an auditor makes ``v`` or more correct guesses out of ``r`` on ``m``
    randomized canaries when training is (``eps``, ``delta``)-DP (Steinke, Nasr & Jagielski 2023, Theorem 5.2)."""
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    p = 1.0 / (1.0 + math.exp(-eps))  # e^ε / (1 + e^ε), written to avoid overflow
    tail = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    cumulative = np.cumsum(binom.pmf(v - i, r, p))  # P[v - i <= Binomial(r, p) < v], i = 1..v
    alpha = float((cumulative / i).max())
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, tol: float = 1e-6) -> float:
    """ε_lb: every ε < ε_lb is rejected at confidence ``1 − beta`` (the p-value of ``v`` correct guesses out of
    ``r`` is below ``beta``); 0 when even ε = 0 cannot be rejected. Bisection to ``tol``, returning the lower end
    (so ε_lb is never rounded up)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    _check_counts(m, r, v)
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # cannot happen for r >= 1 (the tail tends to 1); guards against a non-terminating loop
            raise RuntimeError("epsilon_lower_bound did not bracket the bound")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_from_scores(scores: Tensor, k_pos: int, k_neg: int) -> Tensor:
    """Guesses in {+1 (included), −1 (excluded), 0 (abstain)}: +1 for the ``k_pos`` highest scores, −1 for the
    ``k_neg`` lowest. Ties are broken by canary index (a stable sort): the index order is fixed before the secret
    coins are drawn, so it carries no information about them."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    m = scores.numel()
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={m}, got {k_pos}, {k_neg}")
    if torch.isnan(scores).any():
        raise ValueError("the canary scores contain NaN")
    order = torch.sort(scores, descending=True, stable=True).indices
    guesses = torch.zeros(m, dtype=torch.long)
    guesses[order[:k_pos]] = 1
    if k_neg:
        guesses[order[m - k_neg :]] = -1
    return guesses


@dataclass
class AuditResult:
    """The outcome of a one-run audit: ε_lb at confidence ``1 − beta`` for ``m`` canaries, ``r`` guesses, ``v``
    correct, next to the ε the training claimed (``epsilon_claimed``, ``None`` for a non-private run)."""

    epsilon_lb: float
    epsilon_claimed: float | None
    delta: float
    beta: float
    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    included: int
    candidates: tuple[int, ...]

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        claimed = "none (non-private)" if self.epsilon_claimed is None else f"{self.epsilon_claimed:.3g}"
        return (f"ε_lb = {self.epsilon_lb:.3f} (claimed ε = {claimed}, δ = {self.delta:.3g}, confidence "
                f"{1 - self.beta:.0%}; m = {self.m} canaries, {self.v}/{self.r} guesses correct)")


def audit_from_scores(
    scores: Tensor,
    included: Tensor,
    delta: float,
    beta: float = 0.05,
    num_guesses: int | Sequence[int] | None = None,
    epsilon_claimed: float | None = None,
) -> AuditResult:
    """Turn membership scores (higher = more likely included) into the one-run lower bound.

    Args:
        scores: ``[m]`` one score per canary.
        included: ``[m]`` booleans, the secret coins.
        delta: the δ of the guarantee under test (the run's δ).
        beta: 1 − confidence (default 0.05: 95%).
        num_guesses: ``r`` (split as ``k+ = ⌈r/2⌉`` highest, ``k- = ⌊r/2⌋`` lowest), or several candidate values
            of ``r``: each is then evaluated at ``beta / len(candidates)`` (a union bound, so picking the best one
            after seeing the scores stays valid at ``1 − beta``) and the largest ε_lb is reported. Default: the
            candidates ``m/10, m/4, m/2, m``.
        epsilon_claimed: reported next to ε_lb.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    included = torch.as_tensor(included, dtype=torch.bool).flatten().cpu()
    m = scores.numel()
    if included.numel() != m or m == 0:
        raise ValueError(f"need one score per canary: {m} scores, {included.numel()} coins")
    if num_guesses is None:
        candidates = sorted({max(1, m // 10), max(1, m // 4), max(1, m // 2), m})
    elif isinstance(num_guesses, int):
        candidates = [num_guesses]
    else:
        candidates = sorted({int(r) for r in num_guesses})
    if not candidates or candidates[0] < 1 or candidates[-1] > m:
        raise ValueError(f"numbers of guesses must be in [1, m={m}], got {num_guesses!r}")
    level = beta / len(candidates)
    best = None
    for r in candidates:
        k_pos, k_neg = (r + 1) // 2, r // 2
        guesses = guess_from_scores(scores, k_pos, k_neg)
        made = guesses != 0
        v = int(((guesses == 1) & included).sum() + ((guesses == -1) & ~included).sum())
        eps_lb = epsilon_lower_bound(m, int(made.sum()), v, delta, level)
        if best is None or eps_lb > best.epsilon_lb:
            best = AuditResult(eps_lb, epsilon_claimed, float(delta), float(beta), m, r, v, k_pos, k_neg,
                               int(included.sum()), tuple(candidates))
    assert best is not None
    return best


class DiracCanaryModule(LightningModule):
    """A model for the white-box ("gradient canary") audit of a DP training pipeline.

    The parameters are one vector ``w`` (an ``nn.Embedding(num_coordinates, 1)``), and the example with index ``j``
    has the loss ``ℓ_j(w) = −scale · w[j]``: its gradient is ``−scale · e_j``, a "dirac" in coordinate ``j``, of norm
    ``scale`` (choose ``scale ≥ C``, so DP-SGD clips it to exactly ``C``; for DPZero, ``scale·|z_j| ≥ C`` for most
    directions). Each canary gets its own coordinate, so after training its loss drop
    ``ℓ_j(w_0) − ℓ_j(w_T) = scale · ⟨w_T − w_0, e_j⟩`` is the white-box score of Steinke et al.: the sum of what
    the released updates moved along the canary's gradient. Examples are 1-element tensors of coordinate indices,
    so they go through the strategy's ordinary data path (Poisson sampling, clipping, noise, accounting).

    ``optimizer``: ``"sgd"`` (plain SGD; DPZero requires it) or ``"adam"``.
    """

    def __init__(self, num_coordinates: int, scale: float = 100.0, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.w = nn.Embedding(num_coordinates, 1)
        nn.init.zeros_(self.w.weight)
        self.scale = float(scale)
        self.lr = float(lr)
        self.optimizer_name = optimizer

    def forward(self, index: Tensor) -> Tensor:
        return -self.scale * self.w(index.reshape(-1)).reshape(-1)

    def training_step(self, batch, batch_idx):
        index = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(index)  # per-example losses [B]

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)
