"""Stagewise schedule of private zeroth-order training (DP-ZOSO, Liu et al., arXiv 2402.07818) for DPZeroStrategy."""

from __future__ import annotations

import math
from typing import Any

from lightning_dp.errors import ConfigurationError
from lightning_dp.mechanisms.zo import StagewiseSchedule
from lightning_dp.strategies.dpzero import DPZeroStrategy, ZOPlan

__all__ = ["StagewiseZO"]


class StagewiseZO(ZOPlan):
    """Run :class:`~lightning_dp.DPZeroStrategy` in stages whose length doubles, decaying the learning rate and the
    finite-difference step λ per stage, with an optional proximal pull toward each stage's start point::

        trainer = L.Trainer(strategy=DPZeroStrategy(eps=8, zo_eps=1e-3), max_steps=7000,
                            callbacks=[StagewiseZO(stages=3, lr_decay=0.5, zo_eps_end=1e-4, prox=5e-4)])

    * Stage ``s`` starts at step ``T0·(2^s − 1)``: lengths T0, 2·T0, 4·T0, ...; the last stage runs to the end.
      ``first_stage_steps=None`` (default) picks ``T0 = ⌈planned_steps / (2^stages − 1)⌉`` so the stages fill the
      run (``max_steps``, or ``max_epochs`` × steps per epoch, as the strategy plans them).
    * The learning rate of every parameter group of your SGD optimizer is multiplied by ``lr_decay`` at the start
      of each stage after the first: the change goes through ``optimizer.param_groups`` (what the strategy's update
      reads, what ``LearningRateMonitor`` logs, what a checkpoint saves). An LR scheduler would fight it, so one is
      refused unless ``lr_decay=1``.
    * λ decays geometrically from the strategy's ``zo_eps`` (stage 0) to ``zo_eps_end`` (last stage), computed in
      log space from validated endpoints: never 0, never NaN (``zo_eps_end=None`` keeps λ constant).
    * ``prox=γ > 0`` adds the gradient of ``γ/2·‖θ − θ_anchor‖²`` to every update,
      ``θ <- θ − η·(ĝ·z + γ·(θ − θ_anchor))``, with θ_anchor the clean θ at the start of the current stage.
      Cost: one copy of the *trainable* coordinates (under full fine-tuning, a second copy of the model; under a
      :class:`~lightning_dp.callbacks.pruning.ZOPruning` mask, of the masked coordinates only), also saved in
      checkpoints, and one more read-modify-write pass over those coordinates per step.

    The privacy guarantee is unchanged: the schedule depends only on the step, never on data; σ and the accounting
    are the strategy's. Stage boundaries cost one extra pass over the parameters (the previous update does not fuse
    the next perturbation), a handful per run. The strategy calls the schedule itself (no Lightning between-step
    hook), so ``zo_schedule="auto"`` keeps two passes per step. Resume from a checkpoint with the same
    ``max_steps``: λ, the anchor and the learning rate are restored with it.
    """

    order = 10  # after a pruning plan: the anchor is taken over the new mask

    def __init__(
        self,
        stages: int = 3,
        first_stage_steps: int | None = None,
        lr_decay: float = 0.5,
        zo_eps_end: float | None = None,
        prox: float = 0.0,
    ) -> None:
        if not (isinstance(stages, int) and stages >= 1):
            raise ValueError(f"`stages` must be an integer >= 1, got {stages!r}")
        if first_stage_steps is not None and not (isinstance(first_stage_steps, int) and first_stage_steps >= 1):
            raise ValueError(f"`first_stage_steps` must be an integer >= 1 or None, got {first_stage_steps!r}")
        if not (isinstance(lr_decay, (int, float)) and math.isfinite(lr_decay) and 0 < lr_decay <= 1):
            raise ValueError(f"`lr_decay` must be in (0, 1], got {lr_decay!r}")
        if zo_eps_end is not None and not (
            isinstance(zo_eps_end, (int, float)) and math.isfinite(zo_eps_end) and zo_eps_end > 0
        ):
            raise ValueError(f"`zo_eps_end` must be a finite number > 0 (or None), got {zo_eps_end!r}")
        if not (isinstance(prox, (int, float)) and math.isfinite(prox) and prox >= 0):
            raise ValueError(f"`prox` must be a finite number >= 0, got {prox!r}")
        self.stages = stages
        self.first_stage_steps = first_stage_steps
        self.lr_decay = float(lr_decay)
        self.zo_eps_end = None if zo_eps_end is None else float(zo_eps_end)
        self.prox = float(prox)
        self._schedule: StagewiseSchedule | None = None

    def schedule(self, strategy: DPZeroStrategy) -> StagewiseSchedule:
        """The resolved schedule (needs the strategy's planned steps when ``first_stage_steps`` is None)."""
        if self._schedule is None:
            first = self.first_stage_steps
            if first is None:
                if strategy.planned_steps is None:
                    raise ValueError(
                        "StagewiseZO(first_stage_steps=None) fits the stages to the planned number of steps, but "
                        "training is not bounded: set `max_steps` on the Trainer or pass `first_stage_steps`"
                    )
                first = max(1, math.ceil(strategy.planned_steps / ((1 << self.stages) - 1)))
            start = strategy.zo_eps_start
            self._schedule = StagewiseSchedule(
                stages=self.stages,
                first_stage_steps=first,
                lr_decay=self.lr_decay,
                zo_eps_start=start,
                zo_eps_end=start if self.zo_eps_end is None else self.zo_eps_end,
            )
        return self._schedule

    def stage_of(self, strategy: DPZeroStrategy, step: int) -> int:
        return self.schedule(strategy).stage_of(step)

    # ------------------------------------------------------------------ called by DPZeroStrategy
    def zo_setup(self, strategy: DPZeroStrategy, trainer: Any, resumed: bool) -> None:
        self._schedule = None  # resolved at the first step, once the strategy knows its planned steps
        if self.lr_decay != 1.0 and trainer.lr_scheduler_configs:
            raise ConfigurationError(
                "StagewiseZO sets the learning rate per stage (lr_decay) through the optimizer's param groups; an LR "
                "scheduler would overwrite it. Remove the scheduler from `configure_optimizers`, or pass lr_decay=1."
            )
        strategy.prox = self.prox
        if resumed:
            if self.prox > 0 and strategy.directions.anchor is None:
                raise ConfigurationError(
                    "StagewiseZO(prox>0): the checkpoint holds no proximal anchor (it was not written by a stagewise "
                    "run with prox > 0); the stage's start point is unknown"
                )
            return
        strategy.zo_eps = strategy.zo_eps_start
        if self.prox > 0:
            strategy.set_anchor()

    def zo_is_boundary(self, strategy: DPZeroStrategy, step: int) -> bool:
        return self.schedule(strategy).is_stage_start(step)

    def zo_boundary(self, strategy: DPZeroStrategy, trainer: Any, step: int) -> None:
        schedule = self.schedule(strategy)
        if not schedule.is_stage_start(step):
            return
        for optimizer in strategy.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_decay
        strategy.zo_eps = schedule.zo_eps(schedule.stage_of(step))
        if self.prox > 0:
            strategy.set_anchor()
