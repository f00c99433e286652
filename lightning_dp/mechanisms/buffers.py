"""Buffers updated from training data are a release that no mechanism privatizes.

A ``BatchNorm`` layer in train mode writes the mean and variance of each batch into its ``running_mean`` /
``running_var`` buffers; those buffers are saved with the model, so a released checkpoint carries an un-noised
statistic of the training data. Every DP strategy refuses such modules (:func:`data_dependent_buffer_modules`) and,
for anything the static check cannot know about (a custom module that writes a buffer in ``forward``), compares all
buffers before and after the first training step (:class:`BufferSnapshot`) and refuses any that changed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BufferSnapshot", "data_dependent_buffer_modules", "describe_buffer_modules"]


def data_dependent_buffer_modules(module: nn.Module, train_mode_only: bool = True) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of normalization layers that update running statistics from their inputs:
    ``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` with ``track_running_stats=True``. With
    ``train_mode_only`` only those in train mode (in eval mode they read their buffers and do not write them)."""
    found = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            if mod.training or not train_mode_only:
                found.append((name or "<root>", mod))
    return found


def describe_buffer_modules(found: list[tuple[str, nn.Module]]) -> str:
    return ", ".join(f"{name} ({type(mod).__name__})" for name, mod in found)


class BufferSnapshot:
    """A copy of every buffer of ``module``; :meth:`changed` names the modules whose buffers differ from it."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._copies: dict[str, Tensor] = {name: b.detach().clone() for name, b in module.named_buffers()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the snapshot's values back into the buffers that still have their shape and dtype (so that a
        checkpoint written after a refusal does not carry what the forward wrote)."""
        for name, b in self._module.named_buffers():
            old = self._copies.get(name)
            if old is not None and old.shape == b.shape and old.dtype == b.dtype:
                b.copy_(old)

    @torch.no_grad()
    def changed(self) -> list[str]:
        """Names (``module.buffer``) of the buffers whose value, shape or dtype changed since the snapshot, and of
        buffers that appeared."""
        out = []
        for name, b in self._module.named_buffers():
            old = self._copies.get(name)
            if old is None or old.shape != b.shape or old.dtype != b.dtype:
                out.append(name)
            elif not torch.equal(old, b.detach().to(old.device)) and not _both_nan_equal(old, b.detach()):
                out.append(name)
        return out


def _both_nan_equal(a: Tensor, b: Tensor) -> bool:
    if not a.is_floating_point():
        return False
    return bool(torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b.to(a.device), nan=0.0))
                and torch.equal(torch.isnan(a), torch.isnan(b.to(a.device))))
