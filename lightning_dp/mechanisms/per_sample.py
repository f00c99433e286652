"""The per-example loss contract shared by every DP strategy.

``training_step`` returns either a Tensor of shape ``[B]`` (one loss per example, e.g. ``reduction="none"``,
averaged over each sequence's own tokens) or a dict with ``"per_sample_loss"`` of shape ``[B]`` (and optionally
``"loss"``, which is only logged). A privacy mechanism bounds each *example's* contribution, so a batch-level
scalar cannot be accepted: it is an error, never a silent batch-level clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_dp.errors import PerSampleLossError

__all__ = ["PerSampleLossError", "per_sample_loss"]

_HOW_TO_FIX = (
    "DP training bounds the contribution of each example, so `training_step` must return one loss per example: "
    "either a Tensor of shape [B] or a dict {'per_sample_loss': Tensor[B], 'loss': optional scalar for logging}. "
    "For a classifier use `F.cross_entropy(logits, y, reduction='none')`; for a language model average the token "
    "losses of each sequence over its own tokens (shape [B])."
)


def per_sample_loss(output: Any, batch_size: int | None = None) -> Tensor:
    """Extract and validate the ``[B]`` per-example losses from a ``training_step`` output."""
    if isinstance(output, Tensor):
        losses = output
        where = "the Tensor returned by `training_step`"
    elif isinstance(output, Mapping):
        if "per_sample_loss" not in output:
            keys = sorted(map(str, output.keys()))
            raise PerSampleLossError(
                f"`training_step` returned a dict without 'per_sample_loss' (keys: {keys}). {_HOW_TO_FIX}"
            )
        losses = output["per_sample_loss"]
        where = "`per_sample_loss`"
        if not isinstance(losses, Tensor):
            raise PerSampleLossError(f"{where} is a {type(losses).__name__}, not a Tensor. {_HOW_TO_FIX}")
    elif output is None:
        raise PerSampleLossError(
            f"`training_step` returned None (a skipped step would break the accounting). {_HOW_TO_FIX}"
        )
    else:
        raise PerSampleLossError(f"`training_step` returned a {type(output).__name__}. {_HOW_TO_FIX}")
    if losses.ndim != 1:
        hint = " (a scalar: the batch mean?)" if losses.ndim == 0 else ""
        raise PerSampleLossError(f"{where} has shape {tuple(losses.shape)}{hint}; expected [B]. {_HOW_TO_FIX}")
    if batch_size is not None and losses.shape[0] != batch_size:
        raise PerSampleLossError(
            f"{where} has {losses.shape[0]} entries but the batch has {batch_size} examples. {_HOW_TO_FIX}"
        )
    if not losses.is_floating_point():
        raise PerSampleLossError(f"{where} has dtype {losses.dtype}; expected a floating-point loss. {_HOW_TO_FIX}")
    return losses
