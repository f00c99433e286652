"""The library's error types, in the layer below strategies and callbacks so that both can raise them."""

from __future__ import annotations

__all__ = ["UnsafeSettingError"]


class UnsafeSettingError(ValueError):
    """A Trainer, module or strategy setting that would silently break the privacy guarantee or its accounting."""
