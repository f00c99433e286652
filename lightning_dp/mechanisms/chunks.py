"""Physical chunks of a logical batch: a Poisson batch of ``B`` examples is processed ``M`` examples at a time.

:func:`split_batch` cuts every tensor of the batch whose dim 0 is the number of examples into consecutive slices
of at most ``M`` rows (views, no copy); entries that are not tensors, and 0-dim tensors, are passed unchanged to
every chunk. Mappings (``dict``, HF ``BatchEncoding``, ...), tuples (named or not) and lists keep their type. A
tensor of ``ndim > 0`` whose dim 0 is not the number of examples is an error: which of its rows belong to which
examples is unknown, and passing it whole would make each chunk's per-example losses disagree with its examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_dp.errors import PerSampleLossError

__all__ = ["chunk_sizes", "split_batch", "with_batch"]


def chunk_sizes(size: int, max_size: int | None) -> list[int]:
    """The sizes of the chunks of a batch of ``size`` examples: ``⌈size / max_size⌉`` chunks of ``max_size``, the
    last one partial; one chunk when ``max_size`` is ``None`` or ``size <= max_size``; none when ``size == 0``.

    Raises:
        ValueError: ``size < 0`` or ``max_size < 1``.
    """
    if size < 0:
        raise ValueError(f"a batch cannot have {size} examples")
    if max_size is not None and max_size < 1:
        raise ValueError(f"`max_size` must be None or >= 1, got {max_size!r}")
    if size == 0:
        return []
    if max_size is None or size <= max_size:
        return [size]
    full, rest = divmod(size, max_size)
    return [max_size] * full + ([rest] if rest else [])


def split_batch(batch: Any, size: int, max_size: int | None) -> list[tuple[Any, int]]:
    """``batch`` (of ``size`` examples) as a list of ``(chunk, chunk_size)`` of at most ``max_size`` examples each.

    With a single chunk (``max_size`` is ``None`` or ``size <= max_size``) the batch itself is returned, untouched.

    Raises:
        PerSampleLossError: a tensor of the batch has a dim 0 other than ``size`` (when the batch must be split), or a
            mapping type of the batch cannot be rebuilt from a ``dict`` of its items.
    """
    sizes = chunk_sizes(size, max_size)
    if len(sizes) <= 1:
        return [(batch, s) for s in sizes]
    return list(zip(_split(batch, size, sizes), sizes))


def _split(obj: Any, size: int, sizes: list[int]) -> list[Any]:
    if isinstance(obj, Tensor):
        if obj.ndim == 0:
            return [obj] * len(sizes)
        if obj.shape[0] != size:
            raise PerSampleLossError(
                f"a tensor of the batch has shape {tuple(obj.shape)}, whose dim 0 is not the batch's {size} examples: "
                "it cannot be split into physical batches (`max_physical_batch_size`). Make every tensor of the "
                "batch batch-first."
            )
        return list(obj.split(sizes))
    if isinstance(obj, Mapping):
        parts = {key: _split(value, size, sizes) for key, value in obj.items()}
        return [_rebuild_mapping(obj, {key: part[c] for key, part in parts.items()}) for c in range(len(sizes))]
    if isinstance(obj, (list, tuple)):
        parts = [_split(value, size, sizes) for value in obj]
        rows = [[part[c] for part in parts] for c in range(len(sizes))]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return [type(obj)(*row) for row in rows]
        return [type(obj)(row) for row in rows]
    return [obj] * len(sizes)


def _rebuild_mapping(template: Mapping, items: dict) -> Mapping:
    try:
        return type(template)(items)
    except TypeError as err:
        raise PerSampleLossError(
            f"the batch holds a {type(template).__name__}, which cannot be rebuilt from a dict of its items to split "
            "it into physical batches (`max_physical_batch_size`); use a dict or a tuple"
        ) from err


def with_batch(args: tuple, kwargs: dict, batch: Any) -> tuple[tuple, dict]:
    """The ``training_step`` arguments ``(args, kwargs)`` with the batch (``args[0]`` or ``kwargs["batch"]``)
    replaced by ``batch``."""
    if args:
        return (batch, *args[1:]), kwargs
    return args, {**kwargs, "batch": batch}
