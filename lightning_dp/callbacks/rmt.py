"""``callbacks=[RMTDenoise()]``: random-matrix denoising of the private gradient of each weight matrix under
``DPSGDStrategy`` (post-processing: ε is unchanged)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from custom_kernels.zo_perturb import mix_seed
from lightning_dp.denoise import NORM_CORRECTIONS, SVD_METHODS, denoise_matrix, weight_matrices
from lightning_dp.errors import ConfigurationError, IncompatibleStrategyError
from lightning_dp.strategies.dpsgd import DPSGDStrategy

__all__ = ["RMTDenoise"]


class RMTDenoise(Callback):
    """Replace the private gradient ``G̃ = G + N`` of each selected weight matrix by its random-matrix estimate of
    ``G`` (:func:`lightning_dp.denoise.denoise_matrix`): singular values inside the Marchenko–Pastur bulk
    ``κ·s(√m + √n)`` are removed, those above it shrunk to their Frobenius-optimal value for known noise.

    The noise std ``s = σ·C / (q·N)`` is read from ``DPSGDStrategy.gradient_noise_std`` at every step (nothing to
    compute by hand). The gradient is changed in place in ``on_before_optimizer_step``, i.e. after the strategy has
    written the private gradient and before the optimizer (and any gradient logging of later callbacks) reads it.

    Guarantee: it reads only the released private gradient and the public noise std, so it is post-processing: the
    privacy report (ε, δ, steps) is exactly that of the same run without it. Frozen parameters, biases, norms and
    (by default) embeddings are never touched.

    Cost: one SVD per selected matrix per step (``svd="auto"``: a randomized low-rank SVD when few singular values
    survive, else a full one), in fp32. The time spent is logged (``{prefix}ms``) with the number of surviving
    singular values (``{prefix}rank_total``, ``{prefix}rank_mean``, ``{prefix}zeroed_layers``, and per layer
    ``{prefix}rank/<module name>`` with ``log_per_layer``) and ``{prefix}max_edge_ratio``, the largest singular
    value of any selected gradient over its threshold (below 1: every selected matrix was zeroed). Under DDP every
    rank denoises the same (all-reduced) gradient with the same seeds.

    Args:
        kappa: threshold in units of the bulk edge (``κ ≥ 1``; 1 = the edge).
        min_dim: denoise only matrices with ``min(m, n) >= min_dim`` (the bulk edge is an asymptotic law; tiny
            matrices such as LoRA factors or a 2-class head are left as they are).
        layers: ``fnmatch`` patterns on module names selecting which linear layers to denoise (default: all
            ``nn.Linear`` and transformers ``Conv1D`` layers with a trainable weight), e.g.
            ``["*.attention.*", "*.intermediate.dense"]``.
        embeddings: also denoise trainable ``nn.Embedding`` weights (default ``False``).
        norm_correction: ``None``, ``"observed"`` or ``"signal"`` (see :func:`~lightning_dp.denoise.denoise_matrix`).
        svd: ``"auto"``, ``"full"`` or ``"lowrank"``.
        log_per_layer: also log each layer's surviving count.
        prefix: prefix of the logged keys.
        seed: seed of the low-rank SVD's private generators (mixed with the step and the layer's index).
    """

    def __init__(
        self,
        kappa: float = 1.0,
        min_dim: int = 64,
        layers: str | Sequence[str] | None = None,
        embeddings: bool = False,
        norm_correction: str | None = None,
        svd: str = "auto",
        log_per_layer: bool = True,
        prefix: str = "rmt/",
        seed: int = 0,
    ) -> None:
        if not kappa >= 1:
            raise ValueError(f"kappa must be >= 1 (1 = the Marchenko–Pastur bulk edge), got {kappa!r}")
        if min_dim < 1:
            raise ValueError(f"min_dim must be >= 1, got {min_dim}")
        if norm_correction not in NORM_CORRECTIONS:
            raise ValueError(f"norm_correction must be one of {NORM_CORRECTIONS}, got {norm_correction!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        self.kappa = float(kappa)
        self.min_dim = int(min_dim)
        self.layers = layers
        self.embeddings = bool(embeddings)
        self.norm_correction = norm_correction
        self.svd = svd
        self.log_per_layer = bool(log_per_layer)
        self.prefix = prefix
        self.seed = int(seed)
        self.targets: list[tuple[str, torch.nn.Parameter]] = []
        self.last_ranks: dict[str, int] = {}
        self.last_max_edge_ratio = math.nan
        self.last_seconds = 0.0
        self.total_seconds = 0.0
        self.steps = 0

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, DPSGDStrategy):
            raise IncompatibleStrategyError(
                "RMTDenoise removes the DP noise of the private gradient written by DPSGDStrategy, whose per-entry "
                f"std it reads from `strategy.gradient_noise_std`; got strategy {type(strategy).__name__}. Use "
                "`Trainer(strategy=DPSGDStrategy(...), callbacks=[RMTDenoise()])`."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.targets = weight_matrices(pl_module, self.layers, embeddings=self.embeddings, min_dim=self.min_dim)
        if not self.targets:
            raise ConfigurationError(
                f"RMTDenoise found no trainable weight matrix to denoise (linear layers with min(m, n) >= "
                f"min_dim={self.min_dim}, layers={self.layers!r}, embeddings={self.embeddings}); lower `min_dim` or "
                "remove the callback"
            )
        self.last_ranks = {}
        self.last_seconds = self.total_seconds = 0.0
        self.steps = 0

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        noise_std = trainer.strategy.gradient_noise_std  # raises with a clear message if unknown
        devices = {p.device for _, p in self.targets}
        _sync(devices)
        start = time.perf_counter()
        ranks: dict[str, int] = {}
        edge_ratios: list[float] = []
        with torch.no_grad():
            for index, (name, weight) in enumerate(self.targets):
                if weight.grad is None or not weight.requires_grad:
                    continue
                result = denoise_matrix(
                    weight.grad,
                    noise_std,
                    kappa=self.kappa,
                    norm_correction=self.norm_correction,
                    svd=self.svd,
                    rank_hint=max(8, 2 * self.last_ranks.get(name, 0)),
                    seed=mix_seed(self.seed, trainer.global_step, index),
                )
                weight.grad.copy_(result.matrix)
                ranks[name] = result.rank
                edge_ratios.append(result.top_value / result.threshold if result.threshold > 0 else math.nan)
        _sync(devices)
        self.last_seconds = time.perf_counter() - start
        self.total_seconds += self.last_seconds
        self.steps += 1
        self.last_ranks = ranks
        self.last_max_edge_ratio = max(edge_ratios, default=math.nan)
        self._log(pl_module, ranks)

    def _log(self, pl_module: LightningModule, ranks: dict[str, int]) -> None:
        if not ranks:
            return
        total = sum(ranks.values())
        metrics = {
            f"{self.prefix}rank_total": float(total),
            f"{self.prefix}rank_mean": total / len(ranks),
            f"{self.prefix}zeroed_layers": float(sum(r == 0 for r in ranks.values())),
            f"{self.prefix}ms": 1e3 * self.last_seconds,
            f"{self.prefix}max_edge_ratio": self.last_max_edge_ratio,
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if self.log_per_layer:
            per_layer = {f"{self.prefix}rank/{name}": float(r) for name, r in ranks.items()}
            pl_module.log_dict(per_layer, on_step=True, on_epoch=False)

    @property
    def mean_ms_per_step(self) -> float:
        """Mean time spent denoising per optimizer step so far, in milliseconds."""
        return 1e3 * self.total_seconds / max(self.steps, 1)


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
