"""Activation (gradient) checkpointing and per-example clipping.

The per-example hooks of DP-SGD (:mod:`lightning_dp.mechanisms.dpsgd`) capture each hooked module's input during the
forward pass and its output gradient during the backward. Non-reentrant checkpointing
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, the default of Hugging Face's
``gradient_checkpointing_enable()`` in transformers 5) keeps the original graph: the hooks see every use, the result
is exact. Reentrant checkpointing runs the forward under ``no_grad`` and a second, hidden forward inside the
backward: the hooks never see the modules inside a checkpointed block, so their per-example gradients are unknown.
"""

from __future__ import annotations

import functools

from torch import nn

__all__ = ["reentrant_checkpointing"]


def reentrant_checkpointing(module: nn.Module) -> list[str]:
    """Names of the submodules that run Hugging Face gradient checkpointing in reentrant mode
    (``gradient_checkpointing = True`` with a checkpoint function bound to ``use_reentrant=True``).

    A checkpoint function whose mode cannot be read (not a ``functools.partial``) is not listed: the strategy's
    first-step check (Σ of the per-example gradients against autograd's gradient) still refuses it.
    """
    found = []
    for name, mod in module.named_modules():
        if getattr(mod, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(mod, "_gradient_checkpointing_func", None)
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is True:
            found.append(name or "<root>")
    return found
