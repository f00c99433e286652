"""The per-client guarantees of federated DP-LoRA (no Lightning import), on Opacus's accountants through
:class:`~lightning_dp.privacy.accounting.PrivacyAccountant`. Both are data-independent worst cases: which rounds a
client took part in is the secret the client sampling's amplification rests on, and per-client dataset sizes are
statistics of the clients' data, so neither is ever used except through the worst case (every round; the smallest
non-empty dataset)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_dp.mechanisms.federated import client_noise_std
from lightning_dp.privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier

__all__ = ["FederatedAccounting"]


class FederatedAccounting:
    """ε of the per-client guarantees by one accountant kind (``"prv"`` or ``"rdp"``), cached (PRV costs tens of ms).

    Args:
        kind: the accountant kind.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._cache: dict[tuple, float] = {}

    def composed(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε of ``steps`` sampled Gaussian releases at (σ, q)."""
        key = (noise_multiplier, sample_rate, steps, delta)
        if key not in self._cache:
            acc = PrivacyAccountant(self.kind)
            acc.step(noise_multiplier, sample_rate, steps)
            self._cache[key] = acc.epsilon(delta)
        return self._cache[key]

    def local_epsilon(
        self, noise_multiplier: float | None, num_clients: int, placement: str, rounds: int, delta: float | None
    ) -> float:
        """ε of one client's uploads against the server that sees them one by one: the client's dataset replaced by
        any other, so sensitivity 2C against per-upload noise σC (``"local"``) or σC/√K (``"distributed"``), no
        sampling amplification, a client that took part in each of ``rounds`` rounds."""
        if delta is None or noise_multiplier is None or not rounds:
            return 0.0
        per_upload = client_noise_std(noise_multiplier, 1.0, num_clients, placement)
        return self.composed(per_upload / 2.0, 1.0, rounds, delta)

    def example_epsilon(
        self,
        noise_multiplier: float | None,
        batch_size: int,
        shard_sizes: Sequence[int],
        steps: int,
        delta: float | None,
    ) -> float:
        """Example-level ε of the DP-SGD inside a client after ``steps`` local steps, for the smallest non-empty
        client dataset (the highest Poisson rate ``batch_size / N_k``)."""
        if noise_multiplier is None or delta is None or not steps:
            return 0.0
        rate = worst_example_rate(batch_size, shard_sizes)
        return 0.0 if rate is None else self.composed(noise_multiplier, rate, steps, delta)

    def calibrate_example_noise(
        self, target_epsilon: float, delta: float, batch_size: int, shard_sizes: Sequence[int], steps: int
    ) -> float:
        """σ of the DP-SGD inside each client for ``target_epsilon`` after ``steps`` local steps of a client with
        the smallest non-empty dataset.

        Raises:
            ValueError: if every client dataset is empty.
        """
        rate = worst_example_rate(batch_size, shard_sizes)
        if rate is None:
            raise ValueError("every client shard is empty: no data to train on")
        return calibrate_noise_multiplier(target_epsilon, delta, rate, steps, self.kind)


def worst_example_rate(batch_size: int, shard_sizes: Sequence[int]) -> float | None:
    """``min(1, batch_size / N_min)`` over the non-empty client datasets (``None`` if all are empty)."""
    nonempty = [size for size in shard_sizes if size > 0]
    return min(1.0, batch_size / min(nonempty)) if nonempty else None
