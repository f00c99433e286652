"""``Trainer(strategy=DPZeroStrategy(eps=8))``: private zeroth-order fine-tuning at the memory of inference."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.optim import Optimizer

from custom_kernels.zo_perturb import DISTRIBUTIONS
from lightning_dp.errors import IncompatibleStrategyError
from lightning_dp.mechanisms.chunks import split_batch, with_batch
from lightning_dp.mechanisms.per_sample import per_sample_loss
from lightning_dp.mechanisms.zo import (
    SeededDirections,
    ZOStepResult,
    clip_differences,
    privatize_projected_gradients,
)
from lightning_dp.preflight import optimizer_problems, raise_if_problems
from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError

__all__ = ["DPZeroStrategy", "ZOPlan"]


class DPZeroStrategy(DPStrategyBase):
    """DPZero (Zhang et al., ICML 2024): two forward passes at θ ± λz, per-example finite differences clipped to C,
    Gaussian noise on one scalar per step, in-place seeded update ``θ <- θ − η·ĝ·z``. No backward pass, no
    gradients, no optimizer state: the memory of inference.

    Use it with any LightningModule whose ``training_step`` returns per-example losses (a Tensor ``[B]`` or a dict
    with ``"per_sample_loss"``) and whose ``configure_optimizers`` returns ``torch.optim.SGD`` without momentum:
    its learning rate, ``weight_decay`` and your LR schedulers drive the update. The parameters that are perturbed
    and updated are the optimizer's parameters that require grad (e.g. only the LoRA adapters of a PEFT model).

    One step:

    1. z for step t is drawn from a counter-based stream seeded by (``seed``, t): identical on every rank and after
       a resume, never the global RNG; it is regenerated in place and never stored.
    2. ``training_step`` runs twice under ``no_grad``, at θ + λz and at θ − λz, each in its own autocast region. By
       default dropout is off for both (``dropout="off"``, the module is in ``eval()`` mode during the two probes,
       as in MeZO/DPZero); ``dropout="same"`` keeps train mode and replays the RNG state so both probes see the same
       dropout masks. Side effects of ``training_step`` (``self.log``, metric updates) happen twice per step.
    3. ``s_i = (ℓ_i⁺ − ℓ_i⁻) / (2λ)`` per example, clipped to [−C, C] and summed; the sums of all ranks are
       all-reduced together with N(0, σ²C²) drawn once (rank 0, OS-entropy generator); the result is divided by the
       expected batch size q·N to give ĝ, identical on every rank.
    4. One fused pass removes the −λz probe offset and applies ``θ <- (1 − η·wd)·θ − η·ĝ·z`` per parameter group.

    Three passes over the parameters per step (+λz, −2λz, restore+update), or two (``zo_schedule``); the parameters
    seen by validation, checkpoints, callbacks and after an exception are always the clean θ.

    Several directions per step (``num_directions=q``): steps 1–3 run for q seeded directions z_1..z_q on the same
    batch (2q probes), each releasing its own noisy scalar ĝ_j, and the update is ``θ <- θ − η·(1/q)·Σ_j ĝ_j·z_j``.
    The q releases share one Poisson batch, so together they are ONE Gaussian mechanism: the vector of q clipped
    sums has ℓ2 sensitivity √q·C and noise σ·C per entry, i.e. noise multiplier σ/√q. σ is calibrated as √q times
    the σ that T single-direction steps would need, and the accountant records one step at σ/√q per optimizer step
    (``privacy_report()["effective_noise_multiplier"]``); accounting the q releases as q independently sampled
    steps would under-report ε several-fold.

    Stagewise schedules and sparse (pruned) training are callbacks that plug into this strategy
    (:class:`~lightning_dp.callbacks.stagewise.StagewiseZO`, :class:`~lightning_dp.callbacks.pruning.ZOPruning`,
    subclasses of :class:`ZOPlan`): the strategy calls them itself, at stage boundaries, on the clean θ.

    Args:
        eps: target ε for the whole run (σ is calibrated for the steps the Trainer will take).
        delta: δ; default ``1 / N**1.1`` (N = training set size).
        noise_multiplier: σ, instead of ``eps``; ε is then reported as it is spent.
        clip: C, the bound on each example's finite difference (a directional derivative: it scales like a gradient
            norm, so ZO clips are larger than DP-SGD's; DPZero used 50–400 on RoBERTa-large).
        accountant: ``"prv"`` (default) or ``"rdp"`` (Opacus's accountants).
        poisson_sampling: Poisson sampling of every step's batch (default), or ``False`` to keep your DataLoader's
            batches, accounted without amplification (see :class:`~lightning_dp.strategies.base.DPStrategyBase`).
        max_physical_batch_size: the most examples per forward pass: larger logical batches run their probes in
            chunks at the same θ ± λz; the clipped differences are summed, one noised release per direction.
        seed: seed of the directions z (public, saved in checkpoints); drawn if ``None``.
        sampling_seed: seed of the Poisson masks; leave ``None`` (a secret seed, never saved).
        zo_eps: λ, the finite-difference step (1e-3 as in MeZO/DPZero for full fine-tuning; ~1e-2 for LoRA).
        dropout: ``"off"`` (default) or ``"same"``; see step 2.
        zo_schedule: ``"auto"`` (default), ``"two_pass"`` or ``"three_pass"`` (passes over the parameters per step).
        num_directions: q, the number of directions per step (default 1, DPZero); costs 2q forward passes per
            step, and σ is √q times larger at the same ε (see above).
        direction_distribution: the distribution of z's coordinates: ``"gaussian"`` (default; standard normal, as in
            the MeZO and DPZero code) or ``"rademacher"`` (independent uniform signs ±1, cheaper to generate).
            Privacy does not depend on it (z is data-independent; only the clipped scalar is released); what the
            papers prove for each is on the strategy's documentation page. Saved in checkpoints: a resume must use
            the same.
        cluster_environment: Lightning's cluster environment (normally chosen by the Trainer).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default: Lightning's choice.
        timeout: timeout of the collectives.
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Raises:
        ValueError: an argument out of range.
        UnsafeSettingError: at setup, a Trainer setting that would break the guarantee (accumulation, gradient
            clipping, fp16 GradScaler, ...).
        ValidationError: at setup, before any step: every problem of the module and its optimizer at once (an
            optimizer other than momentum-free SGD, manual optimization, non-contiguous parameters, ...; see
            :func:`lightning_dp.validate`).
    """

    mechanism_name = "dpzero"

    def __init__(
        self,
        *,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 10.0,
        accountant: Literal["prv", "rdp"] = "prv",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        sampling_seed: int | None = None,
        zo_eps: float = 1e-3,
        dropout: Literal["off", "same"] = "off",
        zo_schedule: Literal["auto", "two_pass", "three_pass"] = "auto",
        num_directions: int = 1,
        direction_distribution: Literal["gaussian", "rademacher"] = "gaussian",
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if not (isinstance(num_directions, int) and num_directions >= 1):
            raise ValueError(f"`num_directions` must be an integer >= 1, got {num_directions!r}")
        if zo_schedule not in ("auto", "two_pass", "three_pass"):
            raise ValueError(f"`zo_schedule` must be 'auto', 'two_pass' or 'three_pass', got {zo_schedule!r}")
        if not zo_eps > 0:
            raise ValueError(f"`zo_eps` must be > 0, got {zo_eps!r}")
        if dropout not in ("off", "same"):
            raise ValueError(f"`dropout` must be 'off' or 'same', got {dropout!r}")
        if direction_distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"`direction_distribution` must be one of {DISTRIBUTIONS}, got {direction_distribution!r}"
            )
        super().__init__(
            eps=eps,
            delta=delta,
            noise_multiplier=noise_multiplier,
            clip=clip,
            accountant=accountant,
            poisson_sampling=poisson_sampling,
            max_physical_batch_size=max_physical_batch_size,
            seed=seed,
            sampling_seed=sampling_seed,
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.zo_eps = float(zo_eps)  # λ of the current step (a stagewise schedule changes it per stage)
        self.zo_eps_start = float(zo_eps)  # λ as configured
        self.num_directions = num_directions
        self.direction_distribution = direction_distribution
        self.releases_per_step = num_directions  # q releases on one batch: one mechanism at σ/√q (DPStrategyBase)
        self.prox = 0.0  # γ of the proximal pull γ(θ − θ_anchor) (set by a stagewise schedule)
        self.zo_plans: list[ZOPlan] = []
        self.last_steps: list[ZOStepResult] = []
        self.dropout = dropout
        self.zo_schedule = zo_schedule
        self.schedule: str | None = None  # resolved at setup: "two_pass" or "three_pass"
        self.directions: SeededDirections | None = None
        self._group_of: list[int] = []
        self._step_inputs: tuple[list[int], list[Tensor] | None] | None = None
        self.last_step: ZOStepResult | None = None
        """The last step's released scalar and its parts (clipped sum, noise, realized batch size). The clipped sum
        and the batch size are NOT private (they are statistics of the sampled records before noise): for debugging
        and tests only, never log or release them (``last_steps`` likewise)."""

    # ------------------------------------------------------------------ setup
    def setup_mechanism(self, trainer: Any) -> None:
        if len(self.optimizers) != 1:
            raise UnsafeSettingError(f"DPZeroStrategy needs exactly one optimizer, got {len(self.optimizers)}")
        optimizer = self.optimizers[0]
        self._build_directions(optimizer)
        self._setup_plans(trainer)
        if self.zo_schedule == "auto":
            unsafe = _code_between_steps(trainer)
            self.schedule = "three_pass" if unsafe else "two_pass"
            if unsafe:
                rank_zero_info(
                    f"DPZeroStrategy: three passes per step, because {', '.join(unsafe)} may read the parameters "
                    "between steps (pass zo_schedule='two_pass' to override, or set `reads_parameters = False` on a "
                    "callback that never reads them)"
                )
        else:
            self.schedule = self.zo_schedule

    @staticmethod
    def _trainable(optimizer: Optimizer) -> tuple[list[Tensor], list[int]]:
        """The optimizer's parameters that require grad (each once, in order) and their param-group indices."""
        params, groups, seen = [], [], set()
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
                    groups.append(g)
        return params, groups

    def _build_directions(self, optimizer: Optimizer) -> None:
        # SGD without momentum, trainable parameters that are contiguous (and fp32, else a warning): all problems in
        # one error (lightning_dp.validate)
        raise_if_problems(optimizer_problems(self.lightning_module, [optimizer], self), type(self).__name__)
        params, groups = self._trainable(optimizer)
        self.directions = SeededDirections(params, self.seed, self.direction_distribution)
        self._group_of = groups

    def _sync_trainable(self) -> None:
        """The parameters perturbed and updated are the optimizer's trainable ones *now*: when a callback changed
        them after setup (unfroze a layer and added it to the optimizer), the directions are rebuilt over the new
        set (on the clean θ), so nothing trainable is silently left out. With a ZO plan (mask, anchor) the change
        is refused: those are laid out over the old set."""
        assert self.directions is not None
        params, _ = self._trainable(self.optimizers[0])
        if [id(p) for p in params] == [id(p) for p in self.directions.params]:
            return
        if self.zo_plans:
            raise UnsafeSettingError(
                "the optimizer's trainable parameters changed during training, but the ZO plans "
                f"({', '.join(type(p).__name__ for p in self.zo_plans)}) hold masks/anchors over the old set. Keep "
                "the trainable set fixed with StagewiseZO/ZOPruning."
            )
        self._restore()
        rank_zero_info(
            f"DPZeroStrategy: the trainable parameters changed ({len(self.directions.params)} -> {len(params)} "
            "tensors): perturbing and updating the new set from this step on"
        )
        self._build_directions(self.optimizers[0])

    def _setup_plans(self, trainer: Any) -> None:
        """Find the ZO plans among the callbacks, restore the mask/anchor/λ of a checkpoint, let the plans set up."""
        assert self.directions is not None
        self.zo_plans = sorted((cb for cb in trainer.callbacks if isinstance(cb, ZOPlan)), key=lambda plan: plan.order)
        restored = self._restored
        state = (restored or {}).get("zo")
        if restored is not None and int((state or {}).get("num_directions", 1)) != self.num_directions:
            raise UnsafeSettingError(
                f"the checkpoint was trained with num_directions={(state or {}).get('num_directions', 1)}, this run "
                f"uses {self.num_directions}: σ was calibrated for that many releases per step"
            )
        trained_with = (state or {}).get("direction_distribution", "gaussian")
        if restored is not None and trained_with != self.direction_distribution:
            raise UnsafeSettingError(
                f"the checkpoint was trained with direction_distribution={trained_with!r}, this run uses "
                f"{self.direction_distribution!r}: resume with the distribution the run started with"
            )
        if state is not None:
            self.directions.load_state_dict(state)
            self.zo_eps = float(state["zo_eps"])
            self.prox = float(state["prox"])
        for plan in self.zo_plans:
            plan.zo_setup(self, trainer, resumed=restored is not None)

    # ------------------------------------------------------------------ what the plans may change (clean θ only)
    def set_mask(self, indices: list[Tensor] | None) -> None:
        """Train only the coordinates ``indices[k]`` (flat indices) of each trainable parameter ``k`` (in the
        optimizer's order), or all of them (``None``). Removes any pending perturbation first; drops the anchor."""
        assert self.directions is not None
        self._restore()
        if indices is not None and self.world_size > 1:
            indices = self.broadcast([i.cpu() for i in indices])  # every rank trains exactly rank 0's coordinates
        self.directions.set_mask(indices)

    def set_anchor(self) -> None:
        """θ_anchor <- the clean trainable coordinates (the start point of a stage, for the proximal term)."""
        assert self.directions is not None
        self._restore()
        self.directions.set_anchor()

    def _boundary_at(self, step: int) -> bool:
        return any(plan.zo_is_boundary(self, step) for plan in self.zo_plans)

    # ------------------------------------------------------------------ the step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The probes of one step. With ``max_physical_batch_size=M`` the batch runs in chunks of at most M
        examples: for each direction z_j, every chunk is probed at θ + λz_j, then every chunk at θ − λz_j; the
        per-example differences of all chunks are clipped and summed into the direction's one release. The returned
        ``"loss"`` is the mean over all examples and probes; other entries of a returned dict are those of the first
        probe of the first chunk.

        Raises:
            PerSampleLossError: ``training_step`` did not return one loss per example of its (chunk of the) batch,
                or the batch cannot be split into chunks (a tensor that is not batch-first).
        """
        assert self.directions is not None
        trainer = self.lightning_module.trainer
        step = trainer.global_step
        batch = args[0] if args else kwargs.get("batch")
        size = self._begin_step(trainer, batch)
        self._sync_trainable()
        if self.zo_plans and self._boundary_at(step):
            self._restore()  # the update of the previous step did not fuse this step's +λz (see _private_update)
            for plan in self.zo_plans:
                plan.zo_boundary(self, trainer, step)
        seeds = [self.directions.seed_for(step, j) for j in range(self.num_directions)]
        empty = size == 0
        # chunks of at most `max_physical_batch_size` examples, all probed at the same θ ± λz_j
        chunks = [] if empty else split_batch(batch, size, self.max_physical_batch_size)
        probes = [(self._probe_fn(*with_batch(args, kwargs, chunk)), n) for chunk, n in chunks]
        losses = []  # per direction: (ℓ⁺, ℓ⁻) over the whole batch, in chunk order
        first = None
        with torch.no_grad(), self._probe_mode():
            # an empty shard still makes the same passes, so parameters stay bit-identical across ranks
            for seed in seeds:
                pair = []
                for scale in (+self.zo_eps, -self.zo_eps):
                    self.directions.move_to(seed, scale)
                    parts = []
                    for probe, n in probes:
                        out = probe()
                        first = out if first is None else first
                        parts.append(per_sample_loss(out, n))
                        del out
                    pair.append(torch.cat(parts) if parts else None)
                losses.append(pair)
        if empty:
            self._step_inputs = (seeds, None)
            return {"loss": torch.zeros((), device=self.root_device)}
        self._end_forward()
        clipped, means = [], []
        for loss_plus, loss_minus in losses:
            clipped.append(clip_differences(loss_plus, loss_minus, self.zo_eps, self.clip))
            means.append(0.5 * (loss_plus.detach().float().mean() + loss_minus.detach().float().mean()))
        self._step_inputs = (seeds, clipped)
        result = dict(first) if isinstance(first, Mapping) else {}
        result.pop("per_sample_loss", None)
        result["loss"] = torch.stack(means).mean()
        return result

    @contextmanager
    def _probe_mode(self) -> Iterator[None]:
        """The module's mode during all probes of one step: ``eval()`` with ``dropout="off"`` (set once per step,
        not per probe), and afterwards every submodule back in its own mode (a submodule the user keeps in eval
        mode stays there); unchanged with ``dropout="same"``."""
        if self.dropout != "off":
            yield
            return
        modes = [(m, m.training) for m in self.lightning_module.modules()]
        self.lightning_module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _probe_fn(self, args: tuple, kwargs: dict) -> Callable[[], Any]:
        """A callable that runs the user's ``training_step`` once (own autocast region), inside
        :meth:`_probe_mode`.

        ``dropout="same"``: the RNG state is saved at the first call (the chunk's first probe) and replayed at every
        call, so all probes of one chunk (±λ, every direction) see the same dropout masks."""
        run = super().training_step  # Lightning's: own precision/autocast context, then the user's training_step
        if self.dropout == "off":
            return lambda: run(*args, **kwargs)

        device = self.root_device
        saved: tuple[Tensor, Tensor | None] | None = None

        def probe_same_masks() -> Any:
            nonlocal saved
            if saved is None:
                saved = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            cpu_state, cuda_state = saved
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            return run(*args, **kwargs)

        return probe_same_masks

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Zeroth-order: there is no backward pass."""
        return closure_loss

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        closure = self._once_per_step(closure)  # one release per batch

        def zo_closure() -> Any:
            output = closure()  # the two probes (training_step) and the no-op backward
            self._private_update(optimizer)
            return output

        # the precision plugin runs the closure, then `on_before_optimizer_step`, then `optimizer.step()`, which has
        # no gradients to apply: the private update is already done, and schedulers see a normal optimizer step
        model = model or self.lightning_module
        return self.precision_plugin.optimizer_step(optimizer, model=model, closure=zo_closure, **kwargs)

    def _private_update(self, optimizer: Optimizer) -> None:
        assert self.directions is not None and self._step_inputs is not None
        assert self._collective is not None and self.noise_multiplier is not None
        seeds, clipped = self._step_inputs
        self._step_inputs = None
        # one release per direction, each with its own noise draw (together one Gaussian mechanism at σ/√q on
        # this batch, accounted below), all in one all-reduce
        results = privatize_projected_gradients(
            clipped if clipped is not None else [None] * len(seeds),
            noise_std=self.noise_multiplier * self.clip,
            expected_batch_size=self.expected_batch_size,
            collective=self._collective,
            noise=self._noise,
            device=self.root_device,
        )
        groups = optimizer.param_groups
        lrs = [float(groups[g]["lr"]) for g in self._group_of]
        wds = [float(groups[g].get("weight_decay", 0.0)) for g in self._group_of]
        trainer = self.lightning_module.trainer
        step = trainer.global_step
        fuse_next = (
            self.schedule == "two_pass"
            and (trainer.max_steps < 0 or step + 1 < trainer.max_steps)
            and not (self.zo_plans and self._boundary_at(step + 1))  # a plan may change λ, the mask or the anchor
        )
        next_seed = self.directions.seed_for(step + 1) if fuse_next else None
        with torch.no_grad():
            # two-pass schedule: the next step's +λz is fused into this pass and stays pending until that step
            # (or is removed lazily before anything else looks at the parameters)
            self.directions.update(
                seeds, [r.projected_grad for r in results], lrs, wds, next_seed=next_seed, next_scale=self.zo_eps,
                prox=self.prox,
            )
        self.account_step()
        self.last_step = results[0]
        self.last_steps = results

    # ------------------------------------------------------------------ the clean θ is all anyone else sees
    def _restore(self) -> None:
        if self.directions is not None and self.directions.pending:
            with torch.no_grad():
                self.directions.restore()

    def on_exception(self, exception: BaseException) -> None:
        self._restore()
        super().on_exception(exception)

    def on_train_end(self) -> None:
        self._restore()
        super().on_train_end()

    def on_validation_start(self) -> None:
        self._restore()
        super().on_validation_start()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._restore()
        return super().lightning_module_state_dict()

    def teardown(self) -> None:
        self._restore()
        super().teardown()

    def privacy_report(self) -> dict[str, Any]:
        report = super().privacy_report()
        report["zo_eps"] = self.zo_eps
        report["num_directions"] = self.num_directions
        report["direction_distribution"] = self.direction_distribution
        if self.directions is not None:
            report["trainable_coordinates"] = self.directions.num_coordinates
        return report

    def dp_state_dict(self) -> dict[str, Any]:
        state = super().dp_state_dict()
        zo: dict[str, Any] = {
            "num_directions": self.num_directions,
            "direction_distribution": self.direction_distribution,
            "zo_eps": self.zo_eps,
            "prox": self.prox,
        }
        if self.directions is not None:
            zo.update(self.directions.state_dict())  # mask (int32 indices) and proximal anchor, when there are
        state["zo"] = zo
        return state


class ZOPlan(Callback):
    """Base of the callbacks that schedule the state of :class:`DPZeroStrategy` by stage: λ, the learning rate, the
    proximal anchor, the mask of trainable coordinates (``StagewiseZO``, ``ZOPruning``).

    The strategy finds them among the Trainer's callbacks (in ``order``) and calls them itself, never through
    Lightning's between-step hooks, so the two-pass schedule stays available:

    * :meth:`zo_setup` once at setup, on the clean initial θ (``resumed``: the mask, anchor and λ were restored
      from the checkpoint);
    * :meth:`zo_boundary` at the start of every step for which :meth:`zo_is_boundary` is true, before the first
      probe and on the clean θ (the previous update does not fuse that step's first perturbation).

    A plan reads no training data (it is called outside the data path, with no batch).
    """

    order = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and not isinstance(trainer.strategy, DPZeroStrategy):
            raise IncompatibleStrategyError(
                f"{type(self).__name__} works with DPZeroStrategy, got {type(trainer.strategy).__name__}"
            )

    def zo_setup(self, strategy: DPZeroStrategy, trainer: Any, resumed: bool) -> None:
        """Validate the configuration and set up the initial state."""

    def zo_is_boundary(self, strategy: DPZeroStrategy, step: int) -> bool:
        """Whether the plan changes the strategy's state at the start of ``step``."""
        return False

    def zo_boundary(self, strategy: DPZeroStrategy, trainer: Any, step: int) -> None:
        """Change the strategy's state at the start of ``step`` (θ is clean)."""


# Hooks that run between the update pass of step t and the first probe of step t+1 (or at the end of training).
_HOOKS_BETWEEN_STEPS = (
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_batch_start",
    "on_train_epoch_end",
    "on_train_epoch_start",
    "on_validation_start",
    "on_validation_epoch_start",
    "on_train_end",
    "on_exception",
    "on_before_batch_transfer",
    "on_after_batch_transfer",
)


def _code_between_steps(trainer: Any) -> list[str]:
    """Callbacks and LightningModule hooks that may read the parameters while the next step's +λz is pending.

    Lightning's own callbacks that never read parameters (progress bars, model summary, LR monitor, timer, early
    stopping) and checkpointing (the strategy hands out the clean state dict) are safe, as is any callback that
    declares ``reads_parameters = False`` (a class or instance attribute: e.g. a timing or logging callback; the
    library's ``PrivacyBudget`` does).
    """
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        ModelCheckpoint,
        ModelSummary,
        ProgressBar,
        Timer,
    )

    safe = (EarlyStopping, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar, Timer)
    found = []
    for cb in trainer.callbacks:
        if isinstance(cb, safe) or getattr(cb, "reads_parameters", True) is False:
            continue
        if any(is_overridden(h, cb, Callback) for h in _HOOKS_BETWEEN_STEPS):
            found.append(type(cb).__name__)
    module = trainer.lightning_module
    found += [f"{type(module).__name__}.{h}" for h in _HOOKS_BETWEEN_STEPS if is_overridden(h, module, LightningModule)]
    return found
