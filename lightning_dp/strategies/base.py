"""What every DP strategy shares: privacy configuration and accounting, Poisson sampling of the training data,
refusal of unsafe Trainer settings, seeds, checkpoints, and a DDP host that runs as one process when there is
one device.

The host is Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` without the DistributedDataParallel
wrapper (its in-backward all-reduce would average non-private gradients; the mechanisms all-reduce what they
release themselves). With one device no process group is created. Multi-node runs use Lightning's own launchers
(``torchrun``, SLURM) unchanged.
"""

from __future__ import annotations

import math
import secrets
import weakref
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from lightning_dp.errors import UnsafeSettingError
from lightning_dp.mechanisms.buffers import BufferSnapshot
from lightning_dp.mechanisms.collective import Collective, default_collective
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.mechanisms.per_sample import PerSampleLossError
from lightning_dp.preflight import module_problems, raise_if_problems
from lightning_dp.privacy.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    default_delta,
    validate_privacy_args,
)
from lightning_dp.privacy.sampling import (
    OncePerPassBatchSampler,
    PoissonBatchSampler,
    dataset_size,
    is_empty_batch,
    loader_batch_size,
    poisson_dataloader,
)

__all__ = ["DPStrategyBase", "UnsafeSettingError"]

_CHECKPOINT_KEY = "lightning_dp"


class DPStrategyBase(DDPStrategy):
    """Base class of the DP strategies (not used directly).

    Args:
        eps: target ε for the whole run; σ is calibrated for it from the number of steps the Trainer will take.
        delta: δ; default ``1 / N**1.1`` (N = training set size).
        noise_multiplier: σ, instead of ``eps``; ε is then reported as it is spent.
        clip: C, the bound on each example's contribution.
        accountant: ``"prv"`` (default, tight) or ``"rdp"``, both from Opacus.
        poisson_sampling: draw each step's batch by Poisson sampling with rate ``q = batch_size * world_size / N``
            (default; any sampler of your DataLoader is replaced, with a warning naming it if it is not the
            default one). ``False`` keeps your DataLoader's batches and accounts WITHOUT amplification by sampling:
            each pass over the data (an epoch) is one Gaussian release in which every example appears at most once
            (verified as the batches are drawn; samplers with replacement are refused). Much weaker than Poisson
            sampling at the same σ, but it also trains an ``IterableDataset`` (give ``delta`` and ``max_epochs``;
            that every example appears at most once per epoch is then your stream's promise, not checked).
        max_physical_batch_size: the most examples one forward (and backward) pass processes. Each logical batch
            (the DataLoader's ``batch_size``, Poisson-sampled, any size) is run in chunks of at most this many
            examples whose clipped contributions are summed; noise, accounting and the optimizer step happen once per
            logical batch. ``None`` (default): one pass over the whole batch. The replacement for
            ``accumulate_grad_batches``, which DP cannot account.
        seed: seed of the public randomness of the method (e.g. ZO directions); drawn from OS entropy and shared by
            all ranks if ``None``. Saved in checkpoints.
        sampling_seed: seed of the Poisson masks. Leave ``None``: a secret seed is drawn from OS entropy for every
            fit and every resume, and is never saved (whoever knew it could rebuild every step's batch, and the
            amplification by sampling would be void against them). A seed you pass (tests, paired comparisons) IS
            saved in checkpoints: never release such a checkpoint.
        cluster_environment: Lightning's cluster environment (normally chosen by the Trainer: torchrun, SLURM, ...).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default: Lightning's choice for the device.
        timeout: timeout of the collectives.
        start_method: how processes are started with several devices: ``"popen"`` (Lightning's default: the script
            is re-launched), ``"spawn"``, ``"fork"`` or ``"forkserver"`` (Lightning's ``ddp_spawn`` /
            ``ddp_fork`` launchers, e.g. in notebooks).

    The DDP options of :class:`~lightning.pytorch.strategies.DDPStrategy` that configure the
    ``DistributedDataParallel`` wrapper (``find_unused_parameters``, ``static_graph``, communication hooks, ...) do
    not exist here: the model is never wrapped (its in-backward all-reduce would average non-private gradients).

    Raises:
        ValueError: an argument out of range (``eps``/``noise_multiplier`` both or neither given, ``clip <= 0``, ...).
    """

    mechanism_name = "dp"

    releases_per_step = 1
    """Releases of one optimizer step, all computed on the same Poisson batch (e.g. DPZero's ``num_directions`` = k).
    Together they are ONE Gaussian mechanism: the vector of the k clipped releases has ℓ2 sensitivity √k·C and noise
    σ·C per entry, i.e. one sampled Gaussian step with noise multiplier σ/√k (:attr:`effective_noise_multiplier`).
    σ is calibrated as √k times the σ that T single-release steps would need, and one step is recorded per optimizer
    step at σ/√k."""

    registered_as: str | None = None
    """The ``StrategyRegistry`` name this instance was built from (``Trainer(strategy="dpzero")``), if any."""

    def __init__(
        self,
        *,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 1.0,
        accountant: Literal["prv", "rdp"] = "prv",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        sampling_seed: int | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        validate_privacy_args(eps, delta, noise_multiplier, accountant)
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"`clip` must be a finite number > 0, got {clip!r}")
        if max_physical_batch_size is not None and not (
            isinstance(max_physical_batch_size, int) and not isinstance(max_physical_batch_size, bool)
            and max_physical_batch_size >= 1
        ):
            raise ValueError(f"`max_physical_batch_size` must be None or an int >= 1, got {max_physical_batch_size!r}")
        super().__init__(
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.max_physical_batch_size = max_physical_batch_size
        self.target_epsilon = None if eps is None else float(eps)
        self.delta = None if delta is None else float(delta)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip = float(clip)
        self.accountant = PrivacyAccountant(accountant)
        self.poisson_sampling = bool(poisson_sampling)
        self.seed = None if seed is None else int(seed)
        self.sampling_seed = None if sampling_seed is None else int(sampling_seed)
        self._sampling_seed_given = sampling_seed is not None  # only a seed the user chose is ever saved
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.dataset_size: int | None = None
        self.planned_steps: int | None = None
        self.steps_taken = 0  # optimizer steps accounted, over every fit and resume of this run
        self._collective: Collective | None = None
        self._noise: GaussianNoise | None = None
        self._restored: dict[str, Any] | None = None
        # per fit
        self._mask_offset: int | None = None
        self._train_sampler: PoissonBatchSampler | OncePerPassBatchSampler | None = None
        self._steps_per_pass: int | None = None
        self._step_pass: Any = None  # the pass (epoch) of the batch of the current step
        self._accounted_pass: Any = None
        self._steps_in_pass = 0
        self._buffer_snapshot: BufferSnapshot | None = None
        self._snapshot_pending = True
        self._last_closure: weakref.ref | None = None

    # ------------------------------------------------------------------ host: DDP without the wrapper
    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes <= 1:
            reset_seed()
            self.set_world_ranks()
            return
        super().setup_distributed()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # never DistributedDataParallel

    def setup(self, trainer: Any) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._refuse_unsafe_settings(trainer)
        # Lightning's base setup (accelerator, precision, device, optimizers), not DDPStrategy's: no DDP wrapper and
        # no communication hooks; identical initial parameters on every rank is all the mechanisms need
        Strategy.setup(self, trainer)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _sync_module_states(self.model)
        if not fitting:
            return
        self._collective = default_collective()
        self._noise = GaussianNoise(self.root_device)
        restored = self._restored or {}
        seed = restored.get("seed", self.seed)
        self.seed = int(self.broadcast(secrets.randbits(62) if seed is None else seed))
        self._draw_sampling_seed(restored)
        self._mask_offset = None
        self._train_sampler = None
        self._accounted_pass = None
        self._step_pass = None
        self._steps_in_pass = 0
        self._snapshot_pending = True
        self._last_closure = None
        if "steps_taken" in restored:
            self.steps_taken = int(restored["steps_taken"])
        self.setup_mechanism(trainer)

    def _draw_sampling_seed(self, restored: Mapping[str, Any]) -> None:
        """The seed of the sampling masks: the user's (or a checkpoint's copy of the user's), else a fresh secret
        seed from OS entropy for every fit and every resume (masks are keyed by step, so the masks of a resumed run
        are independent of the ones already used)."""
        if restored.get("sampling_seed") is not None:
            self.sampling_seed, self._sampling_seed_given = int(restored["sampling_seed"]), True
        elif not self._sampling_seed_given:
            self.sampling_seed = None
        seed = self.sampling_seed
        self.sampling_seed = int(self.broadcast(secrets.randbits(62) if seed is None else seed))

    def setup_mechanism(self, trainer: Any) -> None:  # pragma: no cover - overridden
        """Build the method's mechanism once the model and optimizers are on their device."""

    def setup_environment(self) -> None:
        """The module is checked before the process group is created (every rank raises the same error, so none
        waits for the others), then again at :meth:`setup`, once ``configure_model`` may have added layers."""
        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise_if_problems(module_problems(module, self), type(self).__name__)
        super().setup_environment()

    def _refuse_unsafe_settings(self, trainer: Any) -> None:
        name = type(self).__name__
        # every problem of the module in one error, before anything is built or run (lightning_dp.validate; a
        # deterministic check, so every rank raises the same); the optimizers are checked in setup_mechanism
        # (manual optimization, layers that mix examples, running statistics, ...: see lightning_dp.preflight)
        raise_if_problems(module_problems(trainer.lightning_module, self), name)
        if trainer.accumulate_grad_batches != 1:
            raise UnsafeSettingError(
                f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` is not supported by {name}: each "
                "micro-batch is a separate data access that the accountant would not see (ε under-reported). For a "
                "batch larger than memory, use a larger `batch_size` with `max_physical_batch_size=` on the strategy "
                "(one release per batch, processed in chunks)."
            )
        from lightning.pytorch.callbacks import GradientAccumulationScheduler

        for cb in trainer.callbacks:
            if isinstance(cb, GradientAccumulationScheduler) and any(f != 1 for f in cb.scheduling.values()):
                raise UnsafeSettingError(
                    f"GradientAccumulationScheduler({cb.scheduling}) would accumulate micro-batches later in the run; "
                    f"{name} releases once per batch and accounts one step per optimizer step. Remove it and use a "
                    "larger `batch_size` (with `max_physical_batch_size=` on the strategy if it does not fit in "
                    "memory)."
                )
        if trainer.gradient_clip_val not in (None, 0, 0.0):
            raise UnsafeSettingError(
                f"`gradient_clip_val={trainer.gradient_clip_val}` does not bound per-example contributions and "
                f"would only act on the already-private update; {name} clips each example to `clip=`. Remove "
                "`gradient_clip_val` from the Trainer."
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise UnsafeSettingError(
                f"`precision='16-mixed'` uses a GradScaler, which scales per-example losses before clipping; "
                f"{name} supports `precision='32-true'` and `'bf16-mixed'`."
            )

    def _check_step_invariants(self, trainer: Any) -> None:
        """What a callback or Lightning may change after setup, checked at the start of every training step, before
        anything is released: gradient accumulation (e.g. ``GradientAccumulationScheduler``) and the number of
        training dataloaders."""
        name = type(self).__name__
        if trainer.accumulate_grad_batches != 1:
            raise UnsafeSettingError(
                f"`accumulate_grad_batches` became {trainer.accumulate_grad_batches} during training (e.g. a "
                f"GradientAccumulationScheduler): {name} releases once per batch and accounts one step per optimizer "
                "step, so accumulated micro-batches would be releases the accountant never sees. Remove the "
                "accumulation and use a larger `batch_size` (with `max_physical_batch_size=` on the strategy if it "
                "does not fit in memory)."
            )
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if combined is not None and len(combined.flattened) != 1:
            raise UnsafeSettingError(
                f"{name} trains on exactly one training dataloader (its sample rate is what the accountant "
                f"composes); got {len(combined.flattened)}. Concatenate the datasets into one DataLoader."
            )

    def _begin_step(self, trainer: Any, batch: Any) -> int:
        """Start of every training step, before any forward: the per-step invariants, the buffer snapshot of the
        first step, and the number of examples the sampler selected for this step's batch (which the per-example
        losses must match; 0 for an empty batch)."""
        self._check_step_invariants(trainer)
        if self._snapshot_pending:
            self._buffer_snapshot = BufferSnapshot(self.lightning_module)
        if self._train_sampler is not None:
            record = self._train_sampler.pop_size(self._mask_offset + trainer.global_step)
            if record is None:
                raise UnsafeSettingError(
                    f"{type(self).__name__}: the batch of step {trainer.global_step} was not drawn by the strategy's "
                    "sampler for this step (a batch skipped or fetched twice by the training loop?): its number of "
                    "examples and its accounting are unknown. One batch must be one optimizer step."
                )
            size, self._step_pass = record
            if is_empty_batch(batch) != (size == 0):
                raise RuntimeError(f"internal error: the sampler selected {size} examples for this step's batch")
            return size
        # no sampler record (an IterableDataset with poisson_sampling=False): the batch's own tensors must agree
        self._step_pass = ("epoch", trainer.current_epoch)
        if is_empty_batch(batch):
            return 0
        size = _batch_size(batch)
        if size is None:
            raise PerSampleLossError(
                "cannot tell how many examples this batch holds: its tensors disagree on dim 0, so per-example "
                "losses could not be checked against the number of examples (per-token losses would be clipped per "
                "token). Make every tensor of the batch batch-first, or use a map-style dataset."
            )
        return size

    def _end_forward(self) -> None:
        """After the forward pass(es) of a step and before its release: on the first step of a fit, refuse any
        buffer the forward changed (a statistic of the training data that would be saved un-noised)."""
        if self._buffer_snapshot is None:
            return
        snapshot, self._buffer_snapshot = self._buffer_snapshot, None
        self._snapshot_pending = False
        self._refuse_changed_buffers(snapshot, "the forward pass of `training_step`")

    def _refuse_changed_buffers(self, snapshot: BufferSnapshot, where: str) -> None:
        """Any buffer changed since ``snapshot`` is put back and refused by name: a statistic of the training data
        that no mechanism privatizes and that checkpoints would carry."""
        changed = snapshot.changed()
        if changed:
            snapshot.restore()  # a checkpoint written on the exception must not carry them
            raise UnsafeSettingError(
                f"{type(self).__name__}: {where} changed the buffer(s) {', '.join(changed)}: a statistic of the "
                "training data that no mechanism privatizes and that checkpoints would carry. Do not write buffers "
                "from training data (BatchNorm -> GroupNorm, `track_running_stats=False`), or keep those modules in "
                "eval mode."
            )

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        return super().optimizer_step(optimizer, self._once_per_step(closure), model, **kwargs)

    def _once_per_step(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The training closure, allowed to run once: every run is a release of the same batch (an optimizer that
        evaluates the closure several times, LBFGS or SAM-style, or a user ``optimizer_step`` that steps twice
        would release several gradients of one batch, which the accountant would count as independent steps)."""
        if self._last_closure is not None and self._last_closure() is closure:
            raise UnsafeSettingError(
                f"{type(self).__name__}: `optimizer.step(closure)` was called a second time for the same batch (a "
                "custom `optimizer_step`?): each call would release another private gradient of that batch. Step "
                "once per batch."
            )
        try:
            self._last_closure = weakref.ref(closure)
        except TypeError:  # pragma: no cover - a closure that cannot be weakly referenced
            self._last_closure = None
        calls = 0

        def closure_once() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise UnsafeSettingError(
                    f"{type(self).__name__}: the optimizer evaluated the training closure more than once in one step "
                    "(e.g. LBFGS, SAM): each evaluation releases a private gradient of the same batch. Use an "
                    "optimizer that evaluates it once (SGD, Adam, AdamW, ...)."
                )
            return closure()

        return closure_once

    # ------------------------------------------------------------------ data: Poisson sampling + calibration
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"{type(self).__name__} needs a torch DataLoader for training, got {type(dataloader).__name__}"
            )
        if self._mask_offset is None:
            # masks are keyed by the optimizer steps taken before (this run, earlier fits, before a resume)
            self._mask_offset = self.steps_taken - trainer.global_step
        batch_size = loader_batch_size(dataloader)
        self._same_on_every_rank("the per-rank batch size", batch_size)
        expected = float(batch_size * self.world_size)
        if not self.poisson_sampling and isinstance(dataloader.dataset, IterableDataset):
            return self._process_iterable(trainer, dataloader, expected)
        num_samples = dataset_size(dataloader)
        self._same_on_every_rank("the training set size N", num_samples)
        sample_rate = min(1.0, expected / num_samples)
        step_source = lambda: self._mask_offset + trainer.global_step  # noqa: E731
        if self.poisson_sampling:
            self._warn_replaced_sampler(dataloader)
            steps_per_epoch = max(1, math.ceil(num_samples / expected))
            sampler = PoissonBatchSampler(
                num_samples,
                sample_rate,
                steps_per_epoch,
                seed=self.sampling_seed,
                rank=self.global_rank,
                world_size=self.world_size,
                step_source=step_source,
            )
        else:
            self._check_sampler_without_replacement(dataloader, num_samples)
            sampler = OncePerPassBatchSampler(
                dataloader.batch_sampler, num_samples, step_source, error=UnsafeSettingError
            )
            steps_per_epoch = len(dataloader)
        self._train_sampler = sampler
        dataloader = poisson_dataloader(dataloader, sampler)
        self._configure_privacy(trainer, num_samples, sample_rate, sample_rate * num_samples, steps_per_epoch)
        return dataloader

    def _process_iterable(self, trainer: Any, dataloader: DataLoader, expected: float) -> DataLoader:
        """``poisson_sampling=False`` with an ``IterableDataset``: N is unknown, each epoch is one release."""
        name = type(self).__name__
        if self.delta is None:
            raise UnsafeSettingError(
                f"{name}(poisson_sampling=False) on an IterableDataset: the training set size is unknown, so the "
                "default δ = 1/N^1.1 cannot be chosen. Pass `delta=` (well below 1/N)."
            )
        rank_zero_warn(
            f"{name}(poisson_sampling=False) trains on an IterableDataset ({type(dataloader.dataset).__name__}): each "
            "epoch is accounted as one Gaussian release, which holds only if every example appears at most once per "
            "epoch over all ranks. That cannot be checked on a stream: it is your dataset's promise.",
        )
        self._train_sampler = None
        try:
            steps_per_epoch: int | None = len(dataloader)
        except TypeError:  # a stream without a length
            steps_per_epoch = None
        self._configure_privacy(trainer, None, None, expected, steps_per_epoch)
        return dataloader

    def _warn_replaced_sampler(self, dataloader: DataLoader) -> None:
        sampler, batch_sampler = _user_sampler(dataloader.sampler), dataloader.batch_sampler
        custom = []
        if type(sampler) not in (SequentialSampler, RandomSampler, DistributedSampler) or (
            isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None)
        ):
            custom.append(f"sampler {type(sampler).__name__}")
        if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
            custom.append(f"batch sampler {type(batch_sampler).__name__}")
        if custom:
            rank_zero_warn(
                f"{type(self).__name__}: your DataLoader's {' and '.join(custom)} is replaced by Poisson sampling "
                "(each example joins each step's batch independently with probability q), which the privacy "
                "accounting requires. Pass `poisson_sampling=False` to keep it (accounted without amplification)."
            )

    def _check_sampler_without_replacement(self, dataloader: DataLoader, num_samples: int) -> None:
        name = type(self).__name__
        sampler = _user_sampler(dataloader.sampler)
        if isinstance(sampler, WeightedRandomSampler) and sampler.replacement or (
            isinstance(sampler, RandomSampler) and sampler.replacement
        ):
            raise UnsafeSettingError(
                f"{name}(poisson_sampling=False): {type(sampler).__name__}(replacement=True) draws examples with "
                "replacement, so one example can appear several times per epoch; the accounting without "
                "amplification assumes at most once. Use a sampler without replacement or Poisson sampling."
            )
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last and sampler.total_size > num_samples:
            raise UnsafeSettingError(
                f"{name}(poisson_sampling=False): the DistributedSampler pads the {num_samples} examples to "
                f"{sampler.total_size} by repeating some of them on other ranks, so they would appear twice per "
                "epoch. Use a training set size divisible by the number of devices, or Poisson sampling."
            )

    def _same_on_every_rank(self, what: str, value: int) -> None:
        """Raise on every rank (never on one alone, which would hang the others) if ``value`` differs across ranks."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or self.world_size <= 1:
            return
        t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=self.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        high, low = float(t[0]), -float(t[1])
        if high != low:
            raise UnsafeSettingError(
                f"{type(self).__name__}: {what} differs across ranks (from {low:g} to {high:g}); every rank must hold "
                "the same training set and batch size (the sample rate q is computed from them)."
            )

    def _planned_steps(self, trainer: Any, steps_per_epoch: int | None) -> int | None:
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        bounds = []
        if max_steps is not None and max_steps >= 0:
            bounds.append(max_steps)
        if max_epochs is not None and max_epochs >= 0 and not (max_epochs == 1000 and max_steps == -1):
            if steps_per_epoch is None:
                return None
            bounds.append(max_epochs * self._limited_steps_per_epoch(trainer, steps_per_epoch))
        return min(bounds) if bounds else None

    @staticmethod
    def _limited_steps_per_epoch(trainer: Any, steps_per_epoch: int) -> int:
        per_epoch = _parse_num_batches(RunningStage.TRAINING, steps_per_epoch, trainer.limit_train_batches)
        return int(per_epoch) if math.isfinite(per_epoch) else steps_per_epoch

    def _planned_releases(self, trainer: Any, steps_per_epoch: int | None) -> int | None:
        """Compositions the run will make: one per step (Poisson sampling), or one per pass over the data."""
        if self.poisson_sampling:
            return self.planned_steps
        max_epochs = trainer.max_epochs
        epochs = None
        if max_epochs is not None and max_epochs >= 0 and not (max_epochs == 1000 and trainer.max_steps == -1):
            epochs = max_epochs
        if steps_per_epoch is not None and self.planned_steps is not None:
            per_epoch = self._limited_steps_per_epoch(trainer, steps_per_epoch)
            by_steps = math.ceil(self.planned_steps / max(1, per_epoch))
            epochs = by_steps if epochs is None else min(epochs, by_steps)
        return epochs

    def _configure_privacy(
        self,
        trainer: Any,
        num_samples: int | None,
        sample_rate: float | None,
        expected_batch_size: float,
        steps_per_epoch: int | None,
    ) -> None:
        restored = self._restored or {}
        if restored and sample_rate is not None and abs(restored["sample_rate"] - sample_rate) > 1e-12:
            raise UnsafeSettingError(
                f"the checkpoint was trained at sample rate {restored['sample_rate']:.6g}, this run would use "
                f"{sample_rate:.6g}: resume with the same dataset, batch size and number of devices"
            )
        if restored and bool(restored.get("poisson_sampling", True)) != self.poisson_sampling:
            raise UnsafeSettingError("resume with the same `poisson_sampling` as the checkpoint's run")
        self.dataset_size = num_samples
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self._steps_per_pass = None
        if not self.poisson_sampling and steps_per_epoch is not None:
            self._steps_per_pass = self._limited_steps_per_epoch(trainer, steps_per_epoch)
        if self.delta is None:
            self.delta = restored.get("delta", default_delta(num_samples))
        self.planned_steps = self._planned_steps(trainer, steps_per_epoch)
        releases = self._planned_releases(trainer, steps_per_epoch)
        if self.target_epsilon is not None:
            if restored:
                self.noise_multiplier = float(restored["noise_multiplier"])
            else:
                if releases is None:
                    unit = "steps" if self.poisson_sampling else "epochs (passes over the data)"
                    raise UnsafeSettingError(
                        f"{type(self).__name__}(eps={self.target_epsilon}) calibrates the noise for the number of "
                        f"{unit} the Trainer will take, but training is not bounded: set `max_steps` or "
                        "`max_epochs` on the Trainer (Lightning's implicit default of 1000 epochs is not taken as a "
                        "plan)" + ("" if self.poisson_sampling or steps_per_epoch else "; a stream without a length "
                                   "needs `max_epochs`") + "."
                    )
                # σ for one release per step (or pass), then √k for the k releases of one step (one mechanism)
                self.noise_multiplier = calibrate_noise_multiplier(
                    self.target_epsilon,
                    self.delta,
                    self._accounted_rate,
                    releases,
                    self.accountant.kind,
                ) * math.sqrt(self.releases_per_step)
        if restored and not self.accountant.history:
            self.accountant.load_state_dict(restored["accountant"])
        rank_zero_info(self.privacy_summary())

    def privacy_summary(self) -> str:
        """One line of the run's privacy settings (ε target, δ, σ, q, steps, C, accountant), printed at fit start."""
        name = type(self).__name__
        if self.target_epsilon is not None:
            origin = f' (default of strategy="{self.registered_as}")' if self.registered_as else ""
            target = f"target ε={self.target_epsilon:g}{origin}"
        else:
            target = "no target ε (noise_multiplier given; ε reported as spent)"
        sigma = "σ=?" if self.noise_multiplier is None else f"σ={self.noise_multiplier:.4g}"
        if self.releases_per_step > 1 and self.noise_multiplier is not None:
            sigma += f" (σ/√{self.releases_per_step}={self.effective_noise_multiplier:.4g} per step)"
        if self.poisson_sampling:
            sampling = "Poisson sampling" if self.sample_rate is None else f"Poisson sampling q={self.sample_rate:.4g}"
        else:
            sampling = "no sampling amplification (poisson_sampling=False)"
        steps = "unbounded steps" if self.planned_steps is None else f"{self.planned_steps} steps planned"
        delta = "δ=?" if self.delta is None else f"δ={self.delta:.3g}"
        chunks = "" if self.max_physical_batch_size is None else f", physical batches ≤ {self.max_physical_batch_size}"
        return (f"{name}: {target}, {delta}, {sigma}, {sampling}, {steps}, C={self.clip:g}, "
                f"accountant={self.accountant.kind}{chunks}")

    # ------------------------------------------------------------------ accounting and report
    @property
    def effective_noise_multiplier(self) -> float | None:
        """σ/√k: the noise multiplier of the one Gaussian mechanism that a step's k same-batch releases form."""
        if self.noise_multiplier is None:
            return None
        return self.noise_multiplier / math.sqrt(self.releases_per_step)

    @property
    def _accounted_rate(self) -> float:
        """The sampling rate the accountant composes: q (Poisson), or 1 (a whole pass, no amplification)."""
        return float(self.sample_rate) if self.poisson_sampling else 1.0

    def account_step(self) -> None:
        """Record one optimizer step (called once per step, after its release): one sampled Gaussian step at
        (σ/√k, q) under Poisson sampling; without it, one Gaussian release (σ/√k, q = 1) at the first step of each
        pass over the data."""
        self.steps_taken += 1
        sigma = self.effective_noise_multiplier
        if self.poisson_sampling:
            self.accountant.step(sigma, self.sample_rate, 1)
            return
        if self._accounted_pass is None or self._step_pass != self._accounted_pass:
            self.accountant.step(sigma, 1.0, 1)
            self._accounted_pass = self._step_pass
            self._steps_in_pass = 0
        self._steps_in_pass += 1

    def _releases_within(self, extra_steps: int) -> int:
        """Compositions that ``extra_steps`` more steps can add."""
        if extra_steps <= 0:
            return 0
        if self.poisson_sampling:
            return extra_steps
        per_pass = self._steps_per_pass
        if per_pass is None:  # a stream of unknown length: any step may start a new epoch
            return extra_steps
        remaining = 0 if self._accounted_pass is None else max(0, per_pass - self._steps_in_pass)
        return 0 if extra_steps <= remaining else math.ceil((extra_steps - remaining) / per_pass)

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta``."""
        if self.delta is None:
            return 0.0
        return self.accountant.epsilon(self.delta)

    def epsilon_after(self, extra_steps: int) -> float:
        """ε that would be spent after ``extra_steps`` more steps."""
        if self.delta is None or self.noise_multiplier is None:
            return 0.0
        extra = self._releases_within(extra_steps)
        return self.accountant.epsilon(self.delta, (self.effective_noise_multiplier, self._accounted_rate, extra))

    def _accounting_note(self) -> str:
        k = self.releases_per_step
        if self.poisson_sampling:
            note = "sampled Gaussian mechanism: Poisson sampling at rate q, one composition per optimizer step"
        else:
            note = ("no amplification by sampling (poisson_sampling=False): each pass over the data is one Gaussian "
                    "release (every example at most once per pass), composed over passes")
        if k > 1:
            note += (f"; the {k} releases of one step share its batch and are accounted together as one Gaussian "
                     f"mechanism with noise multiplier σ/√{k}")
        return note

    def privacy_report(self) -> dict[str, Any]:
        """The run's privacy guarantee so far: ε spent at δ, σ, q, steps, accountant, C, and how they were set.

        Everything in it is a function of public settings and of the number of steps (no statistic of the data)."""
        return {
            "mechanism": self.mechanism_name,
            "privacy_unit": "example",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "effective_noise_multiplier": self.effective_noise_multiplier,
            "releases_per_step": self.releases_per_step,
            "sample_rate": self.sample_rate,
            "steps": self.steps_taken,
            "compositions": self.accountant.steps,
            "planned_steps": self.planned_steps,
            "accountant": self.accountant.kind,
            "accounting": self._accounting_note(),
            "clip": self.clip,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "poisson_sampling": self.poisson_sampling,
            "world_size": self.world_size,
        }

    # ------------------------------------------------------------------ checkpoints
    def dp_state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries to continue the run's privacy spend. Never a secret: the sampling seed is saved
        only if the user chose it (tests); a secret one is redrawn on resume."""
        state = {
            "version": 2,
            "mechanism": self.mechanism_name,
            "seed": self.seed,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "clip": self.clip,
            "poisson_sampling": self.poisson_sampling,
            "releases_per_step": self.releases_per_step,
            "steps_taken": self.steps_taken,
            "accountant": self.accountant.state_dict(),
        }
        if self._sampling_seed_given:
            state["sampling_seed"] = self.sampling_seed
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.dp_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # validate/test/predict use the weights only: no privacy spend is continued
        state = checkpoint.get(_CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
        if state is not None:
            if state.get("mechanism") != self.mechanism_name:
                raise UnsafeSettingError(
                    f"the checkpoint was written by the {state.get('mechanism')!r} mechanism, not "
                    f"{self.mechanism_name!r}: its privacy spend cannot be continued by {type(self).__name__}"
                )
            if float(state["clip"]) != self.clip:
                raise UnsafeSettingError(f"the checkpoint used clip={state['clip']}, this run clip={self.clip}")
            state = dict(state)
            if int(state.get("version", 1)) < 2:
                releases = int(state.get("zo", {}).get("num_directions", 1)) if "zo" in state else 1
                if releases > 1:
                    raise UnsafeSettingError(
                        "this checkpoint's run accounted its same-batch releases as independent steps (ε "
                        "under-reported); its spend cannot be continued. Start a new run."
                    )
                if state.get("sampling_seed") is not None:
                    state.pop("sampling_seed")  # a secret seed of the old format: redrawn, never reused
                state.setdefault("steps_taken", sum(int(n) for _, _, n in state["accountant"]["history"]))
            self._restored = state
        return checkpoint


def _user_sampler(sampler: Any) -> Any:
    """The user's sampler inside Lightning's ``DistributedSamplerWrapper`` (which Lightning puts around a custom
    sampler under a DDP-based strategy)."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if type(sampler).__name__ == "DistributedSamplerWrapper" and inner is not None else sampler


def _batch_size(batch: Any) -> int | None:
    """The batch size when every tensor in the batch agrees on dim 0, else None."""
    sizes = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.ndim > 0:
                sizes.add(obj.shape[0])
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(batch)
    return sizes.pop() if len(sizes) == 1 else None
