"""Data-free pruning for private zeroth-order training (DP-ZOPO, Liu et al., arXiv 2402.07818): DPZeroStrategy
perturbs and updates only a small, data-independent subset of the coordinates."""

from __future__ import annotations

from typing import Any, Callable, Literal

from torch import Tensor, nn

from custom_kernels.zo_perturb import mix_seed
from lightning_dp.errors import ConfigurationError
from lightning_dp.mechanisms.zo import PRUNING_SCORES, data_free_mask
from lightning_dp.strategies.dpzero import DPZeroStrategy, ZOPlan

__all__ = ["ZOPruning"]

_SEED_DOMAIN = 0x9A11


class ZOPruning(ZOPlan):
    """Train only ``trainable_fraction`` of the coordinates of the optimizer's parameters, chosen by a data-free
    score, with :class:`~lightning_dp.DPZeroStrategy`::

        trainer = L.Trainer(strategy=DPZeroStrategy(eps=8), max_steps=2000,
                            callbacks=[ZOPruning(trainable_fraction=0.01), StagewiseZO(stages=3)])

    Scores (:func:`lightning_dp.mechanisms.zo.data_free_mask`): ``"zo_hessian"`` (default, DP-ZOPO's zeroth-order
    second-order score ``|Hĝ ⊙ θ|`` on the sign-linearized network with a constant input) or ``"magnitude"``
    (``|θ|``, the baseline). ``keep="smallest"`` (default, as DP-ZOPO) trains the coordinates with the smallest
    scores. ``objective`` replaces the default constant-input objective
    (:func:`~lightning_dp.mechanisms.zo.constant_input_objective`: ``input_ids=[[1]]`` for a Hugging Face model,
    ``ones_like(example_input_array)`` otherwise) by your own function of the LightningModule.

    Privacy: the mask is computed from the current parameters and a public seed only, never from training data
    (it runs at setup and at stage boundaries, outside the data path), so it costs no privacy: a function of θ0
    (public) and of the already-private iterates is post-processing.

    When: ``recompute="once"`` (default, static mask from the initial θ) or ``"stage"`` (recomputed from the
    current θ at the start of every stage of a :class:`~lightning_dp.callbacks.stagewise.StagewiseZO` callback,
    which must then be present too).

    What it changes: only the masked coordinates are perturbed (z is generated for them only, by the same kernels)
    and updated; every other coordinate stays bit-identical through training (weight decay included: it applies to
    the trained coordinates only). The mask is a sorted int32 list of flat indices per parameter (4 bytes per
    trained coordinate, saved in checkpoints), never a dense float copy. Computing the ``"zo_hessian"`` score holds
    one transient copy of the module's floating parameters (the linearized network) and runs ``4 * num_queries``
    forward passes on a one-token input.
    """

    order = 0  # before StagewiseZO: its anchor is taken over the new mask

    def __init__(
        self,
        trainable_fraction: float = 0.01,
        score: Literal["zo_hessian", "magnitude"] = "zo_hessian",
        recompute: Literal["once", "stage"] = "once",
        keep: Literal["smallest", "largest"] = "smallest",
        num_queries: int = 1,
        zo_eps: float = 1e-3,
        seed: int | None = None,
        objective: Callable[[nn.Module], Tensor] | None = None,
    ) -> None:
        if not (isinstance(trainable_fraction, (int, float)) and 0 < trainable_fraction <= 1):
            raise ValueError(f"`trainable_fraction` must be in (0, 1], got {trainable_fraction!r}")
        if score not in PRUNING_SCORES:
            raise ValueError(f"`score` must be one of {PRUNING_SCORES}, got {score!r}")
        if recompute not in ("once", "stage"):
            raise ValueError(f"`recompute` must be 'once' or 'stage', got {recompute!r}")
        if keep not in ("smallest", "largest"):
            raise ValueError(f"`keep` must be 'smallest' or 'largest', got {keep!r}")
        if not (isinstance(num_queries, int) and num_queries >= 1):
            raise ValueError(f"`num_queries` must be an integer >= 1, got {num_queries!r}")
        if not zo_eps > 0:
            raise ValueError(f"`zo_eps` must be > 0, got {zo_eps!r}")
        self.trainable_fraction = float(trainable_fraction)
        self.score = score
        self.recompute = recompute
        self.keep = keep
        self.num_queries = num_queries
        self.zo_eps = float(zo_eps)
        self.seed = seed
        self.objective = objective
        self.computed_at: list[int] = []  # steps at which a mask was computed in this fit (diagnostics)
        self._stages: Any = None

    def compute_mask(self, strategy: DPZeroStrategy, step: int) -> list[Tensor]:
        """The mask for the strategy's trainable parameters at the current θ (no data involved)."""
        base = self.seed if self.seed is not None else strategy.seed
        return data_free_mask(
            strategy.lightning_module,
            strategy.directions.params,
            self.trainable_fraction,
            self.score,
            seed=mix_seed(_SEED_DOMAIN, base, step),
            zo_eps=self.zo_eps,
            num_queries=self.num_queries,
            keep=self.keep,
            objective=self.objective,
        )

    def _prune(self, strategy: DPZeroStrategy, step: int) -> None:
        strategy.set_mask(self.compute_mask(strategy, step))
        self.computed_at.append(step)

    # ------------------------------------------------------------------ called by DPZeroStrategy
    def zo_setup(self, strategy: DPZeroStrategy, trainer: Any, resumed: bool) -> None:
        from lightning_dp.callbacks.stagewise import StagewiseZO

        self.computed_at = []
        self._stages = None
        if self.recompute == "stage":
            stages = [plan for plan in strategy.zo_plans if isinstance(plan, StagewiseZO)]
            if not stages:
                raise ConfigurationError(
                    "ZOPruning(recompute='stage') recomputes the mask per stage of a StagewiseZO callback: add one"
                )
            self._stages = stages[0]
        if resumed:
            if strategy.directions.indices is None:
                raise ConfigurationError(
                    "ZOPruning: the checkpoint holds no mask (it was not written by a pruned run); the mask of a "
                    "resumed run must be the one it was trained with"
                )
            return
        self._prune(strategy, 0)

    def zo_is_boundary(self, strategy: DPZeroStrategy, step: int) -> bool:
        return self._stages is not None and self._stages.zo_is_boundary(strategy, step)

    def zo_boundary(self, strategy: DPZeroStrategy, trainer: Any, step: int) -> None:
        if self.zo_is_boundary(strategy, step):
            self._prune(strategy, step)
