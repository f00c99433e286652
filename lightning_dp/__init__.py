"""lightning_dp: differential privacy for any LightningModule by changing one Trainer argument.

``Trainer(strategy=DPZeroStrategy(eps=8))`` trains with private zeroth-order optimization on 1..N devices,
``Trainer(strategy=DPSGDStrategy(eps=3))`` with DP-SGD (per-example clipping from one backward pass).
Opacus (accounting), transformers, peft and triton are imported only when used.
"""

from lightning_dp.callbacks import CanaryAudit, PrivacyBudget, RMTDenoise, StagewiseZO, ZOPruning
from lightning_dp.mechanisms.per_sample import PerSampleLossError
from lightning_dp.privacy.sampling import EmptyBatch
from lightning_dp.strategies import DPSGDStrategy, DPZeroStrategy, UnsafeSettingError

__version__ = "0.1.0"

__all__ = [
    "CanaryAudit",
    "DPSGDStrategy",
    "DPZeroStrategy",
    "EmptyBatch",
    "PerSampleLossError",
    "PrivacyBudget",
    "RMTDenoise",
    "StagewiseZO",
    "UnsafeSettingError",
    "ZOPruning",
    "__version__",
]
