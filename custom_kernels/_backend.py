"""Backend selection shared by the kernels (private).

``backend="auto"``: the Triton kernels for CUDA tensors of a supported dtype when triton can be imported (and is not
in interpreter mode), the plain-torch reference for everything else.
``backend="triton"``: always the Triton kernels; a clear error where they cannot run. On the CPU this needs the
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported), which is how the tests run them.
``backend="torch"``: always the reference.

triton is imported here lazily, only when a Triton path is considered, so ``import custom_kernels`` never imports it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def triton_kernels() -> ModuleType:
    """The kernel module (imports triton on first use); a clear error where triton is not installed."""
    try:
        from custom_kernels import _triton_kernels
    except ImportError as err:
        raise RuntimeError(
            f"backend='triton' needs the `triton` package, which could not be imported ({err}); "
            "use backend='torch' (or 'auto') for the plain-torch reference"
        ) from err
    return _triton_kernels


def interpreting(kernels: ModuleType) -> bool:
    """Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1``), i.e. run on the CPU."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.perturb_kernel, InterpretedFunction)


def use_triton(backend: str, device: torch.device, dtype_ok: bool, what: str) -> bool:
    """Decide the path for tensors on ``device``; ``dtype_ok`` says whether the kernel handles their dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        if device.type != "cuda" or not dtype_ok:
            return False
        try:
            kernels = triton_kernels()
        except RuntimeError:
            return False
        return not interpreting(kernels)
    if not dtype_ok:
        raise ValueError(f"{what} (backend='triton')")
    kernels = triton_kernels()
    if interpreting(kernels):
        if device.type != "cpu":
            raise ValueError(
                f"triton runs in interpreter mode (TRITON_INTERPRET=1), which executes kernels on the CPU: "
                f"got a tensor on {device}; move it to the CPU or unset TRITON_INTERPRET"
            )
    elif device.type != "cuda":
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 before triton is "
            "first imported, or use backend='torch'"
        )
    return True
