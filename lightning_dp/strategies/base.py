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
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch.utils.data import DataLoader

from lightning_dp.mechanisms.collective import Collective, default_collective
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.privacy.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    default_delta,
    validate_privacy_args,
)
from lightning_dp.privacy.sampling import (
    PoissonBatchSampler,
    dataset_size,
    loader_batch_size,
    poisson_dataloader,
)

__all__ = ["DPStrategyBase", "UnsafeSettingError"]

_CHECKPOINT_KEY = "lightning_dp"


class UnsafeSettingError(ValueError):
    """A Trainer or strategy setting that would silently break the privacy guarantee or its accounting."""


class DPStrategyBase(DDPStrategy):
    """Base class of the DP strategies (not used directly).

    Args:
        eps: target ε for the whole run; σ is calibrated for it from the number of steps the Trainer will take.
        delta: δ; default ``1 / N**1.1`` (N = training set size).
        noise_multiplier: σ, instead of ``eps``; ε is then reported as it is spent.
        clip: C, the bound on each example's contribution.
        accountant: ``"prv"`` (default, tight) or ``"rdp"``, both from Opacus.
        poisson_sampling: draw each step's batch by Poisson sampling with rate ``q = batch_size * world_size / N``
            (default). ``False`` keeps your DataLoader, with a warning: the accounting assumes Poisson sampling.
        seed: seed of the public randomness of the method (e.g. ZO directions); drawn from OS entropy and shared by
            all ranks if ``None``. Saved in checkpoints.
        sampling_seed: seed of the Poisson masks. Leave ``None`` (secret, from OS entropy) except for tests.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (e.g. ``start_method``,
            ``process_group_backend``, ``timeout``).
    """

    mechanism_name = "dp"

    releases_per_step = 1
    """Releases of the sampled Gaussian mechanism per optimizer step, all on the same Poisson batch (e.g. DPZero's
    ``num_directions``). Each is one composition: σ is calibrated for ``planned_steps * releases_per_step``
    compositions and the accountant records that many per step."""

    def __init__(
        self,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 1.0,
        accountant: str = "prv",
        poisson_sampling: bool = True,
        seed: int | None = None,
        sampling_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        validate_privacy_args(eps, delta, noise_multiplier, accountant)
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"`clip` must be a finite number > 0, got {clip!r}")
        if kwargs.get("find_unused_parameters") or kwargs.get("static_graph"):
            raise ValueError("DP strategies do not wrap the model in DistributedDataParallel: DDP options do not apply")
        super().__init__(**kwargs)
        self.target_epsilon = None if eps is None else float(eps)
        self.delta = None if delta is None else float(delta)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip = float(clip)
        self.accountant = PrivacyAccountant(accountant)
        self.poisson_sampling = bool(poisson_sampling)
        self.seed = None if seed is None else int(seed)
        self.sampling_seed = None if sampling_seed is None else int(sampling_seed)
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.dataset_size: int | None = None
        self.planned_steps: int | None = None
        self._collective: Collective | None = None
        self._noise: GaussianNoise | None = None
        self._restored: dict[str, Any] | None = None

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
        sampling_seed = restored.get("sampling_seed", self.sampling_seed)
        self.sampling_seed = int(self.broadcast(secrets.randbits(62) if sampling_seed is None else sampling_seed))
        self.setup_mechanism(trainer)

    def setup_mechanism(self, trainer: Any) -> None:  # pragma: no cover - overridden
        """Build the method's mechanism once the model and optimizers are on their device."""

    def _refuse_unsafe_settings(self, trainer: Any) -> None:
        name = type(self).__name__
        if not trainer.lightning_module.automatic_optimization:
            raise UnsafeSettingError(
                f"{name} owns the optimization step: manual optimization (`automatic_optimization = False`) would "
                "let `training_step` step the optimizer itself, outside the privacy mechanism. Use automatic "
                "optimization and return per-example losses from `training_step`."
            )
        if trainer.accumulate_grad_batches != 1:
            raise UnsafeSettingError(
                f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` is not supported by {name}: each "
                "micro-batch is a separate data access that the accountant would not see (ε under-reported). Use a "
                "larger `batch_size` instead."
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

    # ------------------------------------------------------------------ data: Poisson sampling + calibration
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"{type(self).__name__} needs a torch DataLoader for training, got {type(dataloader).__name__}"
            )
        num_samples = dataset_size(dataloader)
        batch_size = loader_batch_size(dataloader)
        expected = float(batch_size * self.world_size)
        sample_rate = min(1.0, expected / num_samples)
        if self.poisson_sampling:
            steps_per_epoch = max(1, math.ceil(num_samples / expected))
            sampler = PoissonBatchSampler(
                num_samples,
                sample_rate,
                steps_per_epoch,
                seed=self.sampling_seed,
                rank=self.global_rank,
                world_size=self.world_size,
                step_source=lambda: trainer.global_step,
            )
            dataloader = poisson_dataloader(dataloader, sampler)
        else:
            steps_per_epoch = len(dataloader)
            warnings.warn(
                f"{type(self).__name__}(poisson_sampling=False): your DataLoader's batches are used as they are, "
                f"but ε is accounted as for Poisson sampling at rate q={sample_rate:.4g}. Shuffled fixed-size "
                "batches are not covered by that analysis.",
                UserWarning,
                stacklevel=2,
            )
        self._configure_privacy(trainer, num_samples, sample_rate, sample_rate * num_samples, steps_per_epoch)
        return dataloader

    def _planned_steps(self, trainer: Any, steps_per_epoch: int) -> int | None:
        per_epoch = _parse_num_batches(RunningStage.TRAINING, steps_per_epoch, trainer.limit_train_batches)
        per_epoch = int(per_epoch) if math.isfinite(per_epoch) else steps_per_epoch
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        bounds = []
        if max_steps is not None and max_steps >= 0:
            bounds.append(max_steps)
        if max_epochs is not None and max_epochs >= 0 and not (max_epochs == 1000 and max_steps == -1):
            bounds.append(max_epochs * per_epoch)
        return min(bounds) if bounds else None

    def _configure_privacy(
        self, trainer: Any, num_samples: int, sample_rate: float, expected_batch_size: float, steps_per_epoch: int
    ) -> None:
        restored = self._restored or {}
        if restored and abs(restored["sample_rate"] - sample_rate) > 1e-12:
            raise UnsafeSettingError(
                f"the checkpoint was trained at sample rate {restored['sample_rate']:.6g}, this run would use "
                f"{sample_rate:.6g}: resume with the same dataset, batch size and number of devices"
            )
        self.dataset_size = num_samples
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        if self.delta is None:
            self.delta = restored.get("delta", default_delta(num_samples))
        self.planned_steps = self._planned_steps(trainer, steps_per_epoch)
        if self.target_epsilon is not None:
            if restored:
                self.noise_multiplier = float(restored["noise_multiplier"])
            else:
                if self.planned_steps is None:
                    raise UnsafeSettingError(
                        f"{type(self).__name__}(eps={self.target_epsilon}) calibrates the noise for the number of "
                        "steps the Trainer will take, but training is not bounded: set `max_steps` or `max_epochs` "
                        "on the Trainer (Lightning's implicit default of 1000 epochs is not taken as a plan)."
                    )
                self.noise_multiplier = calibrate_noise_multiplier(
                    self.target_epsilon,
                    self.delta,
                    sample_rate,
                    self.planned_steps * self.releases_per_step,
                    self.accountant.kind,
                )
        if restored and not self.accountant.history:
            self.accountant.load_state_dict(restored["accountant"])

    # ------------------------------------------------------------------ accounting and report
    def account_step(self) -> None:
        """Record the step's ``releases_per_step`` releases of the sampled Gaussian mechanism (called once per
        optimizer step)."""
        self.accountant.step(self.noise_multiplier, self.sample_rate, self.releases_per_step)

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
        extra = extra_steps * self.releases_per_step
        return self.accountant.epsilon(self.delta, (self.noise_multiplier, self.sample_rate, extra))

    def privacy_report(self) -> dict[str, Any]:
        """The run's privacy guarantee so far: ε spent at δ, σ, q, steps, accountant, C, and how they were set."""
        return {
            "mechanism": self.mechanism_name,
            "privacy_unit": "example",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.accountant.steps // self.releases_per_step,
            "compositions": self.accountant.steps,
            "planned_steps": self.planned_steps,
            "accountant": self.accountant.kind,
            "clip": self.clip,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "poisson_sampling": self.poisson_sampling,
            "world_size": self.world_size,
        }

    # ------------------------------------------------------------------ checkpoints
    def dp_state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "mechanism": self.mechanism_name,
            "seed": self.seed,
            "sampling_seed": self.sampling_seed,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "clip": self.clip,
            "accountant": self.accountant.state_dict(),
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.dp_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(_CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
        if state is not None:
            if state.get("mechanism") != self.mechanism_name:
                raise UnsafeSettingError(
                    f"the checkpoint was written by the {state.get('mechanism')!r} mechanism, not "
                    f"{self.mechanism_name!r}: its privacy spend cannot be continued by {type(self).__name__}"
                )
            if float(state["clip"]) != self.clip:
                raise UnsafeSettingError(f"the checkpoint used clip={state['clip']}, this run clip={self.clip}")
            self._restored = dict(state)
        return checkpoint
