"""Callbacks that drop into existing Lightning projects."""

from lightning_dp.callbacks.audit import CanaryAudit
from lightning_dp.callbacks.budget import PrivacyBudget
from lightning_dp.callbacks.pruning import ZOPruning
from lightning_dp.callbacks.rmt import RMTDenoise
from lightning_dp.callbacks.stagewise import StagewiseZO

__all__ = ["CanaryAudit", "PrivacyBudget", "RMTDenoise", "StagewiseZO", "ZOPruning"]
