"""One-run privacy audit of a training run: canaries in, ε lower bound out (Steinke, Nasr & Jagielski 2023)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, default_collate

from lightning_dp.audit import AuditResult, audit_from_scores
from lightning_dp.errors import ConfigurationError
from lightning_dp.mechanisms.per_sample import per_sample_loss

__all__ = ["CanaryAudit"]

LossFn = Callable[[LightningModule, Any], Tensor]


def _training_step_losses(module: LightningModule, batch: Any) -> Tensor:
    """The per-example losses ``training_step`` returns (the DP contract), computed outside the training loop."""
    return per_sample_loss(module.training_step(batch, 0))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class CanaryAudit(Callback):
    """Audit a (DP) training run in one run: insert canaries, train, score them, report an empirical ε lower bound
    (:mod:`lightning_dp.audit`, Steinke, Nasr & Jagielski 2023, arXiv 2305.08846) next to the claimed ε.

    Usage::

        audit = CanaryAudit(canaries)                 # m canary examples, in the format of the training set
        train_set = audit.attach(train_set)           # + each canary with probability ½ (secret coins)
        trainer = L.Trainer(strategy=DPSGDStrategy(eps=2), max_steps=..., callbacks=[audit])
        trainer.fit(model, DataLoader(train_set, batch_size=...))
        print(audit.result)                           # ε_lb = ... (claimed ε = 2, ...)

    - **Insertion through the normal data path**: :meth:`attach` returns the training set plus the included
      canaries; the strategy samples them like every other example (Poisson sampling, clipping, noise, accounting).
      The coins come from a private generator seeded from OS entropy (``seed`` only for tests) and are read only
      after training, by the scoring.
    - **Score** (higher = "included"): the loss drop ``ℓ(θ_0) − ℓ(θ_T)`` of each canary between the start of
      ``fit`` (``on_fit_start``) and its end (``on_fit_end``), or ``−ℓ(θ_T)`` with ``score="loss"``. Losses come
      from ``loss_fn(module, batch) -> Tensor[B]``, by default the per-example losses that ``training_step``
      returns, evaluated under ``no_grad`` in ``eval()`` mode (pass ``loss_fn`` if ``training_step`` logs: logging
      is not allowed in these hooks). With :class:`~lightning_dp.audit.DiracCanaryModule` the loss drop is the
      white-box gradient-canary score ``scale · ⟨θ_T − θ_0, e_j⟩``.
    - **Guesses and bound**: see :func:`~lightning_dp.audit.audit_from_scores` (``num_guesses``, ``beta``); δ is
      the strategy's δ (or ``delta``), and the claimed ε is the strategy's spent ε (``None`` without a DP strategy).

    The result is in :attr:`result` (an :class:`~lightning_dp.audit.AuditResult`) and in :attr:`scores`,
    :attr:`included`. Costs: two extra inference passes over the ``m`` canaries, and the canaries enlarge the
    training set by about ``m/2`` examples (so the sampling rate ``q = B/N`` is computed with them, like for any
    example). Limits: one uninterrupted ``fit`` (the coins are not saved in checkpoints); every rank must see the
    same canaries (pass the same ``seed`` on every rank under DDP).
    """

    def __init__(
        self,
        canaries: Sequence[Any] | Dataset,
        score: str = "loss_drop",
        loss_fn: LossFn | None = None,
        num_guesses: int | Sequence[int] | None = None,
        beta: float = 0.05,
        delta: float | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int = 256,
        seed: int | None = None,
    ) -> None:
        if score not in ("loss_drop", "loss"):
            raise ValueError(f"score must be 'loss_drop' or 'loss', got {score!r}")
        self.canaries = canaries
        self.m = len(canaries)  # type: ignore[arg-type]
        if self.m < 1:
            raise ValueError("CanaryAudit needs at least one canary")
        self.score = score
        self.loss_fn = loss_fn or _training_step_losses
        self.num_guesses = num_guesses
        self.beta = beta
        self.delta = delta
        self.collate_fn = collate_fn or default_collate
        self.batch_size = int(batch_size)
        self._seeded = seed is not None
        generator = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else int(seed))
        self._included = torch.rand(self.m, generator=generator, dtype=torch.float64) < 0.5  # the secret coins
        self._attached = False
        self._loss_start: Tensor | None = None
        self.scores: Tensor | None = None
        self.included: Tensor | None = None
        self.result: AuditResult | None = None

    def attach(self, dataset: Dataset) -> Dataset:
        """``dataset`` followed by the included canaries (each with probability ½, by the secret coins)."""
        if self._attached:
            raise ConfigurationError("CanaryAudit.attach was already called: one audit audits one training set")
        self._attached = True
        chosen = self._included.nonzero().flatten().tolist()
        return ConcatDataset([dataset, Subset(self.canaries, chosen)])  # type: ignore[arg-type]

    @torch.no_grad()
    def canary_losses(self, module: LightningModule) -> Tensor:
        """Per-canary losses ``[m]`` of ``module`` (eval mode, no grad; the module's mode is restored)."""
        was_training = module.training
        module.eval()
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        out = []
        try:
            for start in range(0, self.m, self.batch_size):
                items = [self.canaries[i] for i in range(start, min(self.m, start + self.batch_size))]
                batch = _to_device(self.collate_fn(items), device)
                losses = self.loss_fn(module, batch)
                if losses.shape != (len(items),):
                    raise ConfigurationError(f"loss_fn returned shape {tuple(losses.shape)} for {len(items)} canaries")
                out.append(losses.detach().double().cpu())
        finally:
            module.train(was_training)
        return torch.cat(out)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._attached:
            raise ConfigurationError(
                "CanaryAudit: call `train_set = audit.attach(train_set)` and train on the returned dataset, so the "
                "canaries go through the training data path"
            )
        if trainer.world_size > 1 and not self._seeded:
            raise ConfigurationError(
                "CanaryAudit under DDP needs the same canaries and coins on every rank: pass the same `seed=` on "
                "every rank (keep it secret from the audited code)"
            )
        if self.score == "loss_drop":
            self._loss_start = self.canary_losses(pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        losses = self.canary_losses(pl_module)
        self.scores = (self._loss_start - losses) if self.score == "loss_drop" else -losses
        self.included = self._included.clone()
        strategy = trainer.strategy
        report = strategy.privacy_report() if callable(getattr(strategy, "privacy_report", None)) else None
        delta = self.delta if self.delta is not None else (report or {}).get("delta")
        if delta is None:
            raise ConfigurationError("CanaryAudit: without a DP strategy, give the δ to test with `delta=`")
        claimed = None if report is None else float(report["epsilon"])
        self.result = audit_from_scores(self.scores, self.included, delta, self.beta, self.num_guesses, claimed)
        rank_zero_info(f"CanaryAudit: {self.result}")
