"""The one interface through which mechanisms talk to other ranks: identity on one process, torch.distributed
(any backend) on N. Mechanisms call it unchanged on 1 or N ranks."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["Collective", "LocalCollective", "TorchDistributedCollective", "default_collective"]


class Collective:
    """Rank, world size, and the two collectives the mechanisms need."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def broadcast_int(self, value: int, src: int = 0) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class LocalCollective(Collective):
    """A single process: every collective is the identity."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def broadcast_int(self, value: int, src: int = 0) -> int:
        return int(value)


class TorchDistributedCollective(Collective):
    """The default process group of ``torch.distributed`` (no barrier around the all-reduce: one call per step)."""

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_int(self, value: int, src: int = 0) -> int:
        obj = [int(value)]
        dist.broadcast_object_list(obj, src=src)
        return int(obj[0])


def default_collective() -> Collective:
    """torch.distributed when a process group of more than one rank exists, else the local identity."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCollective()
    return LocalCollective()


