"""Lightning strategies: Trainer hooks mapped onto the mechanisms. Registered with Lightning's StrategyRegistry on
import, so ``Trainer(strategy="dpzero")`` and LightningCLI configs work."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError
from lightning_dp.strategies.dpsgd import DPSGDStrategy
from lightning_dp.strategies.dpzero import DPZeroStrategy
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

__all__ = ["DPLoRAFederatedStrategy", "DPSGDStrategy", "DPStrategyBase", "DPZeroStrategy", "UnsafeSettingError"]


def _registered(name: str, cls: type, eps: float):
    """A registry entry: ``Trainer(strategy=name)`` builds ``cls(eps=eps)`` and remembers the name, so that the
    privacy summary printed at fit start says that ε came from the registry's default."""

    def build(**init_params: object) -> DPStrategyBase:
        strategy = cls(**init_params)
        strategy.registered_as = name
        return strategy

    build.__qualname__ = build.__name__ = f"{cls.__name__}_{name}"
    return build


_REGISTERED = {
    "dpzero": (DPZeroStrategy, 8.0, "DPZero private zeroth-order optimization"),
    "dpsgd": (DPSGDStrategy, 3.0, "DP-SGD, per-example clipping by book-keeping"),
}
for _name, (_cls, _eps, _what) in _REGISTERED.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(
            _name,
            _registered(_name, _cls, _eps),
            description=f"{_what}, default target ε={_eps:g} (pass {_cls.__name__}(eps=...) to choose)",
            eps=_eps,
        )
