"""Poisson sampling for 1..N ranks.

Each step, every example of the training set joins the *global* batch independently with probability ``q``. The
mask is drawn from a secret seed shared by all ranks and keyed by the step number, so:

- every rank sees the same global mask and takes an even shard of it (local sizes differ by at most one);
- every rank yields exactly ``steps_per_epoch`` batches per epoch, empty ones included (an empty batch is a
  valid outcome of Poisson sampling and is never skipped, or ranks would fall out of step and the accounting
  would be wrong);
- the mask of a step depends on (seed, step) only, so a resumed run draws fresh, independent masks for the steps
  it has not taken yet and never replays a mask already used.

An empty batch is passed to the model as an :class:`EmptyBatch` instance (the user's ``collate_fn`` is not called
on an empty list; DP strategies skip the forward for it and contribute nothing but still join the collectives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from custom_kernels.zo_perturb import mix_seed

__all__ = ["EmptyBatch", "PoissonBatchSampler", "poisson_dataloader", "is_empty_batch"]

_MASK_DOMAIN = 0x5A3D  # separates the sampling stream from any other stream derived from the same integers


class EmptyBatch:
    """The batch of a step where Poisson sampling selected no example on this rank."""

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EmptyBatch()"


def is_empty_batch(batch: Any) -> bool:
    return isinstance(batch, EmptyBatch)


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields, per step, this rank's shard of a global Poisson sample of ``range(num_samples)``.

    Args:
        num_samples: N, the training set size.
        sample_rate: q, the inclusion probability of every example at every step.
        steps_per_epoch: how many batches one pass over the sampler yields (``len(sampler)``).
        seed: the secret sampling seed, identical on all ranks.
        rank, world_size: this rank's shard of the global sample.
        step_source: returns the global step at which iteration starts (the strategy passes the Trainer's
            ``global_step``); without it the sampler keeps its own counter.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        step_source: Callable[[], int] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.step_source = step_source
        self._next_step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def global_indices(self, step: int) -> torch.Tensor:
        """The global Poisson sample of ``step`` (sorted example indices), identical on every rank."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(mix_seed(_MASK_DOMAIN, self.seed, step))
        mask = torch.rand(self.num_samples, generator=gen, dtype=torch.float64) < self.sample_rate
        return mask.nonzero().flatten()

    def __iter__(self) -> Iterator[list[int]]:
        start = self.step_source() if self.step_source is not None else self._next_step
        for k in range(self.steps_per_epoch):
            self._next_step = start + k + 1
            yield self.global_indices(start + k)[self.rank :: self.world_size].tolist()


class _CollateWithEmpty:
    """Calls the user's collate function, except for an empty sample list, which becomes an :class:`EmptyBatch`."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 0:
            return EmptyBatch()
        return self.collate_fn(samples)


def poisson_dataloader(dataloader: DataLoader, batch_sampler: PoissonBatchSampler) -> DataLoader:
    """A copy of ``dataloader`` (same dataset, collate function, workers, ...) that draws its batches from
    ``batch_sampler``."""
    kwargs: dict[str, Any] = {
        "batch_sampler": batch_sampler,
        "num_workers": dataloader.num_workers,
        "collate_fn": _CollateWithEmpty(dataloader.collate_fn),
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
    }
    if dataloader.num_workers > 0:
        kwargs["persistent_workers"] = dataloader.persistent_workers
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    return DataLoader(dataloader.dataset, **kwargs)


def dataset_size(dataloader: DataLoader) -> int:
    """N for Poisson sampling; a clear error for datasets without a length (iterable-style)."""
    dataset: Dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"Poisson sampling needs a map-style dataset with a length; got {type(dataset).__name__}. "
            "Use a map-style dataset, or pass `poisson_sampling=False` to keep your loader (the accounting then "
            "assumes Poisson sampling that your loader does not perform)."
        )
    return len(dataset)


def loader_batch_size(dataloader: DataLoader) -> int:
    """The per-rank batch size the user configured (from ``batch_size`` or the batch sampler's ``batch_size``)."""
    if dataloader.batch_size is not None:
        return int(dataloader.batch_size)
    size = getattr(dataloader.batch_sampler, "batch_size", None)
    if size is None:
        raise ValueError(
            "cannot tell the batch size of the training DataLoader (no `batch_size`, and its batch sampler has "
            "none): give the DataLoader a `batch_size`"
        )
    return int(size)
