"""lightning_dp: differential privacy for any LightningModule by changing one Trainer argument.

``Trainer(strategy=DPZeroStrategy(eps=8))`` trains with private zeroth-order optimization on 1..N devices,
``Trainer(strategy=DPSGDStrategy(eps=3))`` with DP-SGD (per-example clipping from one backward pass),
``Trainer(strategy=DPLoRAFederatedStrategy(eps=8, clients=4, rounds=20, lora=LoraConfig(...)))`` federated LoRA
with client-level DP.
Opacus (accounting), transformers, peft and triton are imported only when used.
"""

from lightning_dp import losses
from lightning_dp._version import __version__
from lightning_dp.callbacks import CanaryAudit, PrivacyBudget, RMTDenoise, StagewiseZO, ZOPruning
from lightning_dp.errors import (
    ConfigurationError,
    IncompatibleStrategyError,
    LightningDPError,
    PerSampleLossError,
    PrivacyBudgetExceededError,
    UnsafeSettingError,
    UnsupportedLayerError,
    ValidationError,
)
from lightning_dp.preflight import Problem, fix, validate
from lightning_dp.privacy.sampling import EmptyBatch
from lightning_dp.strategies import DPLoRAFederatedStrategy, DPSGDStrategy, DPZeroStrategy

__all__ = [
    "CanaryAudit",
    "ConfigurationError",
    "DPLoRAFederatedStrategy",
    "DPSGDStrategy",
    "DPZeroStrategy",
    "EmptyBatch",
    "IncompatibleStrategyError",
    "LightningDPError",
    "PerSampleLossError",
    "PrivacyBudget",
    "PrivacyBudgetExceededError",
    "Problem",
    "RMTDenoise",
    "StagewiseZO",
    "UnsafeSettingError",
    "UnsupportedLayerError",
    "ValidationError",
    "ZOPruning",
    "__version__",
    "fix",
    "losses",
    "validate",
]
