"""Privacy budget in the progress bar and the logger, a JSON privacy report at the end, and stopping before a
budget is exceeded."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_dp.errors import IncompatibleStrategyError, PrivacyBudgetExceededError, UnsafeSettingError

__all__ = ["PrivacyBudget"]


class PrivacyBudget(Callback):
    """Track the ε a DP strategy has spent.

    - logs ``privacy/epsilon`` (also to the progress bar) and ``privacy/delta`` to the loggers every
      ``log_every_n_steps`` steps (default: the Trainer's ``log_every_n_steps``; one evaluation of the PRV accountant
      can take a second or more on a CPU, so log less often on long runs). Both are in ``trainer.callback_metrics``,
      so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them;
    - writes the strategy's ``privacy_report()`` as ``privacy_report.json`` to the Trainer's log directory (or
      ``report_path``) when training ends;
    - with ``max_epsilon``, stops training before the step that would spend more than ``max_epsilon`` (useful when
      the strategy was given a ``noise_multiplier`` rather than a target ε). Lightning ignores a stop request until
      the Trainer's ``min_steps`` / ``min_epochs`` are reached, so a minimum that would force steps past the budget
      is refused before training starts, and a step that would exceed the budget raises instead of running. The
      check verifies many steps with one accountant evaluation (see ``_next_step_within_budget``).

    Works with any strategy that has a ``privacy_report()`` method and, for ``max_epsilon``, ``epsilon_after(k)``.

    Args:
        max_epsilon: stop before the step that would spend more than this ε (``None``: never stop).
        log_every_n_steps: log every this many steps; ``None`` (default) follows the Trainer's ``log_every_n_steps``.
        report_path: where the JSON report is written (default: ``privacy_report.json`` in the log directory).
        prog_bar: show ε in the progress bar.

    Raises:
        IncompatibleStrategyError: at setup, the Trainer's strategy has no ``privacy_report()``.
        UnsafeSettingError: before training, ``min_steps``/``min_epochs`` would force steps past ``max_epsilon``.
        PrivacyBudgetExceededError: a step that would exceed ``max_epsilon`` was about to run (the stop request was
            overridden).
    """

    reads_parameters = False
    """Never reads the parameters between steps (DPZeroStrategy keeps its two-pass schedule with it)."""

    EPSILON_KEY = "privacy/epsilon"
    DELTA_KEY = "privacy/delta"

    def __init__(
        self,
        max_epsilon: float | None = None,
        log_every_n_steps: int | None = None,
        report_path: str | None = None,
        prog_bar: bool = True,
    ) -> None:
        if max_epsilon is not None and not (max_epsilon > 0 and math.isfinite(max_epsilon)):
            raise ValueError(f"`max_epsilon` must be a finite number > 0, got {max_epsilon!r}")
        if log_every_n_steps is not None and not (isinstance(log_every_n_steps, int) and log_every_n_steps >= 1):
            raise ValueError(f"`log_every_n_steps` must be >= 1, got {log_every_n_steps}")
        self.max_epsilon = max_epsilon
        self.log_every_n_steps = log_every_n_steps
        self.report_path = report_path
        self.prog_bar = prog_bar
        self.stopped_at_step: int | None = None
        self._last_logged: float | None = None
        # (mechanism, steps taken when verified, k): ε after k more steps from there was checked to be within budget
        self._verified: tuple[tuple, int, int] | None = None

    @staticmethod
    def _strategy(trainer: Trainer) -> Any:
        strategy = trainer.strategy
        if not callable(getattr(strategy, "privacy_report", None)):
            raise IncompatibleStrategyError(
                f"PrivacyBudget needs a DP strategy with `privacy_report()` (e.g. DPZeroStrategy); "
                f"got {type(strategy).__name__}"
            )
        return strategy

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._strategy(trainer)

    def _next_step_within_budget(self, strategy: Any) -> bool:
        """Whether one more step keeps ε ≤ ``max_epsilon``.

        One accountant evaluation costs up to seconds (PRV on a CPU), so for the strategies of this library
        (``DPStrategyBase.epsilon_after``: each further step is the same mechanism at the same σ and q) a check
        verifies several steps at once: ε after k more steps is nondecreasing in k, so if it is within budget for k,
        every one of the next k steps is. k doubles up to the planned steps; the verification is dropped when σ, q
        or δ change or the step count goes back (a new fit). Other strategies are checked at every step."""
        from lightning_dp.strategies.base import DPStrategyBase

        if type(strategy).epsilon_after is not DPStrategyBase.epsilon_after:
            return strategy.epsilon_after(1) <= self.max_epsilon
        steps = strategy.steps_taken
        mechanism = (strategy.delta, strategy.noise_multiplier, strategy.effective_noise_multiplier,
                     strategy.sample_rate, strategy.poisson_sampling, id(strategy.accountant))
        if self._verified is not None:
            known, at, k = self._verified
            if known == mechanism and at <= steps and steps + 1 <= at + k:
                return True
        limit = max(1, (strategy.planned_steps or 0) - steps)
        good, k = 0, 1
        while strategy.epsilon_after(k) <= self.max_epsilon:
            good = k
            if k >= limit:
                break
            k = min(2 * k, limit)
        self._verified = (mechanism, steps, good)
        return good >= 1

    def _stop_if_next_step_exceeds(self, trainer: Trainer) -> None:
        if self.max_epsilon is None:
            return
        strategy = self._strategy(trainer)
        if not self._next_step_within_budget(strategy):
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(
                f"PrivacyBudget: stopping at step {trainer.global_step}: one more step would spend "
                f"ε > {self.max_epsilon} (spent so far: {strategy.epsilon:.4f})"
            )

    def _refuse_forced_overspend(self, trainer: Trainer) -> None:
        """``min_steps`` / ``min_epochs`` that would make Lightning run past the budget are refused up front."""
        fit_loop = trainer.fit_loop
        min_steps = fit_loop.epoch_loop.min_steps or 0
        min_epochs = fit_loop.min_epochs or 0
        per_epoch = trainer.num_training_batches
        # epochs of unknown length force at least one more step each time a stop is ignored
        unknown = trainer.global_step + 1 if min_epochs else 0
        by_epochs = min_epochs * per_epoch if math.isfinite(per_epoch) else unknown
        forced = max(min_steps, by_epochs)
        if forced <= trainer.global_step:
            return
        strategy = self._strategy(trainer)
        spent = strategy.epsilon_after(forced - trainer.global_step)  # ε grows with the steps: one check suffices
        if spent > self.max_epsilon:
            raise UnsafeSettingError(
                f"PrivacyBudget(max_epsilon={self.max_epsilon}): the Trainer's "
                f"min_steps={fit_loop.epoch_loop.min_steps} / min_epochs={fit_loop.min_epochs} force training up to "
                f"step {forced} (ε = {spent:.4g}), and Lightning ignores a stop request until then: the run would "
                "spend more than the budget. Lower `min_steps`/`min_epochs` or raise `max_epsilon`."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.max_epsilon is not None:
            self._refuse_forced_overspend(trainer)
        self._stop_if_next_step_exceeds(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """A step that would exceed the budget never runs (the backstop when a stop request was not honored)."""
        if self.max_epsilon is None:
            return
        strategy = self._strategy(trainer)
        if not self._next_step_within_budget(strategy):
            raise PrivacyBudgetExceededError(
                f"PrivacyBudget: the next step would spend ε = {strategy.epsilon_after(1):.4f} > max_epsilon = "
                f"{self.max_epsilon}, and training did not stop when asked (spent so far: {strategy.epsilon:.4f}). "
                "Something overrides the stop (min_steps/min_epochs, another callback resetting `should_stop`)."
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_next_step_exceeds(trainer)
        every = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))
        if trainer.global_step % every:
            return
        report = self._strategy(trainer).privacy_report()
        self._last_logged = float(report["epsilon"])
        log = dict(on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log(self.EPSILON_KEY, self._last_logged, prog_bar=self.prog_bar, **log)
        if report.get("delta") is not None:
            pl_module.log(self.DELTA_KEY, float(report["delta"]), **log)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = self._strategy(trainer).privacy_report()
        if self.stopped_at_step is not None:
            report["stopped_by_budget_at_step"] = self.stopped_at_step
            report["max_epsilon"] = self.max_epsilon
        if not trainer.is_global_zero:
            return
        path = self.report_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "privacy_report.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        rank_zero_info(
            f"PrivacyBudget: ε = {report['epsilon']:.4f} at δ = {report['delta']:.3g}; report written to {path}"
        )
