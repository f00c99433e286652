"""Privacy accounting: a thin layer over Opacus's accountants.

Everything numeric about (ε, δ) comes from :mod:`opacus.accountants` (PRV by default, RDP as an option); this
module only chooses defaults, validates inputs, keeps the history that checkpoints carry, and imports Opacus lazily
(``import opacus`` costs seconds; ``import lightning_dp`` must not pay it).

Every mechanism in this library is a sampled Gaussian mechanism: per step, each example is included with
probability ``q`` (Poisson sampling), each example's contribution is clipped to norm ``C``, and Gaussian noise of
std ``σ·C`` is added to the sum. Its privacy is fully described by the history ``[(σ, q, steps), ...]``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "ACCOUNTANTS",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "default_delta",
    "validate_privacy_args",
]

ACCOUNTANTS = ("prv", "rdp")


def default_delta(num_examples: int) -> float:
    """The default δ = 1 / N^1.1 (N = training set size): below 1/N, as a meaningful δ must be."""
    if num_examples < 1:
        raise ValueError(f"the training set is empty (N={num_examples}); cannot choose δ")
    return 1.0 / num_examples**1.1


def validate_privacy_args(
    eps: float | None, delta: float | None, noise_multiplier: float | None, accountant: str
) -> None:
    """Raise a clear error for an unusable privacy configuration."""
    if (eps is None) == (noise_multiplier is None):
        raise ValueError(
            "give exactly one of `eps` (target ε, the noise is calibrated for it) or `noise_multiplier` "
            f"(σ, ε is then reported as it is spent); got eps={eps!r}, noise_multiplier={noise_multiplier!r}"
        )
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"`eps` must be a finite number > 0, got {eps!r}")
    if noise_multiplier is not None and not (
        isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ValueError(f"`noise_multiplier` must be a finite number >= 0, got {noise_multiplier!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}")


def calibrate_noise_multiplier(
    eps: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv", epsilon_tolerance: float = 0.01
) -> float:
    """σ such that ``steps`` steps of the sampled Gaussian mechanism at rate ``sample_rate`` spend at most
    ``eps`` at ``delta`` (Opacus's ``get_noise_multiplier``)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=float(eps),
            target_delta=float(delta),
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


class PrivacyAccountant:
    """The (σ, q, steps) history of a run and the ε it has spent, computed by an Opacus accountant.

    The history is plain Python data, so it survives checkpoints (``state_dict`` / ``load_state_dict``) and is
    identical on every rank. ε values are cached per history, since PRV composition costs tens of milliseconds.
    """

    def __init__(self, accountant: str = "prv") -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.kind = accountant
        self.history: list[tuple[float, float, int]] = []
        self._cache: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases of the sampled Gaussian mechanism with (σ, q)."""
        if num_steps < 1:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + num_steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(num_steps)))

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """ε spent at ``delta`` (0 before any step); ``extra=(σ, q, k)`` adds k hypothetical future steps."""
        history = list(self.history)
        if extra is not None and extra[2] > 0:
            history.append((float(extra[0]), float(extra[1]), int(extra[2])))
        history = [h for h in history if h[2] > 0]
        if not history:
            return 0.0
        if any(s == 0 and q > 0 for s, q, _ in history):
            return math.inf
        key = (float(delta), tuple(history))
        if key not in self._cache:
            self._cache[key] = self._compute(history, delta)
        return self._cache[key]

    def _compute(self, history: list[tuple[float, float, int]], delta: float) -> float:
        from opacus.accountants import create_accountant

        acc = create_accountant(self.kind)
        acc.history = [tuple(h) for h in history]
        return float(acc.get_epsilon(delta=delta))

    def max_steps_within(self, max_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float) -> int:
        """The largest k such that the current history plus k more steps at (σ, q) spends at most ``max_epsilon``."""
        if self.epsilon(delta) > max_epsilon:
            return 0
        lo, hi = 0, 1
        while self.epsilon(delta, (noise_multiplier, sample_rate, hi)) <= max_epsilon:
            lo, hi = hi, hi * 2
            if hi > 10**9:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(delta, (noise_multiplier, sample_rate, mid)) <= max_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.kind, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant", self.kind) != self.kind:
            raise ValueError(
                f"the checkpoint was accounted with {state['accountant']!r}, this run uses {self.kind!r}: "
                "resume with the same `accountant`"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
