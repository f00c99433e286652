"""The library's error types, in the layer below mechanisms, strategies and callbacks so that all of them can raise
them. Every error the library raises at training time is one of these (argument checks in constructors raise plain
``ValueError``/``TypeError``); all are importable from ``lightning_dp``.

Each also subclasses the built-in type it refines (``ValueError`` or ``TypeError``), so existing ``except`` clauses
keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "IncompatibleStrategyError",
    "LightningDPError",
    "PerSampleLossError",
    "PrivacyBudgetExceededError",
    "UnsafeSettingError",
    "UnsupportedLayerError",
    "ValidationError",
]


class LightningDPError(Exception):
    """Base class of every error raised by lightning_dp."""


class UnsafeSettingError(LightningDPError, ValueError):
    """A Trainer, module or strategy setting that would silently break the privacy guarantee or its accounting."""


class PerSampleLossError(LightningDPError, ValueError):
    """``training_step`` did not return per-example losses (a Tensor ``[B]`` or ``{"per_sample_loss": [B]}``)."""


class UnsupportedLayerError(LightningDPError, TypeError):
    """A trainable parameter belongs to a module whose per-example gradients cannot be computed."""


class IncompatibleStrategyError(LightningDPError, TypeError):
    """A callback was used with a strategy it does not work with (e.g. ``StagewiseZO`` without ``DPZeroStrategy``)."""


class ConfigurationError(LightningDPError, ValueError):
    """Settings that cannot work together (e.g. a callback's schedule that does not fit the Trainer's steps)."""


class PrivacyBudgetExceededError(UnsafeSettingError):
    """A step would spend more than ``PrivacyBudget(max_epsilon=...)`` allows and training did not stop."""


class ValidationError(UnsafeSettingError):
    """The pre-flight check (``lightning_dp.validate``, also run by the strategies at setup) found problems: the
    message lists every one with its fix, :attr:`problems` holds them (``lightning_dp.Problem``)."""

    def __init__(self, message: str, problems: tuple | list = ()) -> None:
        super().__init__(message, tuple(problems))
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return str(self.args[0])
