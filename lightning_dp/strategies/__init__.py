"""Lightning strategies: Trainer hooks mapped onto the mechanisms. Registered with Lightning's StrategyRegistry on
import, so ``Trainer(strategy="dpzero")`` and LightningCLI configs work."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError
from lightning_dp.strategies.dpsgd import DPSGDStrategy
from lightning_dp.strategies.dpzero import DPZeroStrategy
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

__all__ = ["DPLoRAFederatedStrategy", "DPSGDStrategy", "DPStrategyBase", "DPZeroStrategy", "UnsafeSettingError"]

if "dpzero" not in StrategyRegistry:
    StrategyRegistry.register(
        "dpzero",
        DPZeroStrategy,
        description="DPZero private zeroth-order optimization, target ε=8 (pass DPZeroStrategy(eps=...) to choose)",
        eps=8.0,
    )

if "dpsgd" not in StrategyRegistry:
    StrategyRegistry.register(
        "dpsgd",
        DPSGDStrategy,
        description="DP-SGD, per-example clipping by book-keeping, target ε=3 (pass DPSGDStrategy(eps=...) to choose)",
        eps=3.0,
    )
