"""Accounting (over Opacus's accountants), Poisson sampling for 1..N ranks."""

from lightning_dp.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    default_delta,
    validate_privacy_args,
)
from lightning_dp.privacy.sampling import EmptyBatch, PoissonBatchSampler, is_empty_batch, poisson_dataloader

__all__ = [
    "ACCOUNTANTS",
    "EmptyBatch",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "default_delta",
    "is_empty_batch",
    "poisson_dataloader",
    "validate_privacy_args",
]
