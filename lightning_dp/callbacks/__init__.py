"""Callbacks that drop into existing Lightning projects."""

from lightning_dp.callbacks.audit import CanaryAudit
from lightning_dp.callbacks.budget import PrivacyBudget

__all__ = ["CanaryAudit", "PrivacyBudget"]
