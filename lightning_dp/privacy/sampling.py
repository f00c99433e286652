"""Poisson sampling for 1..N ranks.

Each step, every example of the training set joins the *global* batch independently with probability ``q``. The
sample is drawn from a secret seed shared by all ranks and keyed by the step number, so:

- every rank sees the same global mask and takes an even shard of it (local sizes differ by at most one);
- every rank yields exactly ``steps_per_epoch`` batches per epoch, empty ones included (an empty batch is a
  valid outcome of Poisson sampling and is never skipped, or ranks would fall out of step and the accounting
  would be wrong);
- the mask of a step depends on (seed, key) only. The strategy keys masks by the number of optimizer steps taken
  before (across epochs, restarts and fits of the same strategy: one batch is one step, which the strategies
  enforce), and draws a fresh secret seed for every fit and every resume, so no mask is ever used twice;
- the sampler records how many examples each batch it yielded holds (:meth:`PoissonBatchSampler.pop_size`), so the
  strategy checks the per-example losses against the number of *sampled* examples, not against tensor shapes.

With ``poisson_sampling=False`` the user's batch sampler is kept and wrapped in :class:`OncePerPassBatchSampler`,
which verifies while it runs that no example appears twice in one pass (the assumption of the accounting without
amplification) and records batch sizes the same way.

An empty batch is passed to the model as an :class:`EmptyBatch` instance (the user's ``collate_fn`` is not called
on an empty list; DP strategies skip the forward for it and contribute nothing but still join the collectives).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from custom_kernels.zo_perturb import mix_seed

__all__ = [
    "EmptyBatch",
    "OncePerPassBatchSampler",
    "PoissonBatchSampler",
    "SizeRecords",
    "is_empty_batch",
    "poisson_dataloader",
]

_MASK_DOMAIN = 0x5A3D  # separates the sampling stream from any other stream derived from the same integers
_MAX_RECORDS = 4096  # batch sizes kept for batches yielded ahead of training (prefetch); older ones are dropped


class SizeRecords:
    """``key -> (number of examples, pass)`` of the batches a sampler yielded, popped by the strategy when it trains
    on the batch of that key (the sampler runs in the main process, also with worker processes)."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[int, int]] = {}

    def record(self, key: int, size: int, pass_index: int) -> None:
        self._records[key] = (size, pass_index)
        if len(self._records) > _MAX_RECORDS:
            del self._records[min(self._records)]

    def pop(self, key: int) -> tuple[int, int] | None:
        """The record of ``key`` (``None`` if the sampler never yielded it); older records are dropped."""
        found = self._records.pop(key, None)
        for old in [k for k in self._records if k < key]:
            del self._records[old]
        return found


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
        step_source: returns the key of the first batch of an iteration (the strategy passes the number of
            optimizer steps taken so far, see the module docstring); without it the sampler keeps its own counter.
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
        self._sizes = SizeRecords()
        self._passes = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def pop_size(self, key: int) -> tuple[int, int] | None:
        """``(examples in this rank's batch of key, pass index)`` of a yielded batch, or ``None``."""
        return self._sizes.pop(key)

    def global_indices(self, step: int) -> torch.Tensor:
        """The global Poisson sample of ``step`` (sorted example indices), identical on every rank.

        Drawn as the gaps between consecutive sampled examples: every example joins independently with probability
        ``q`` exactly when these gaps are i.i.d. Geometric(q) (``P(gap = k) = (1-q)^(k-1) q``, ``k >= 1``; the
        first gap counts from index -1). A gap is ``floor(log V / log(1-q)) + 1`` for ``V`` uniform on (0, 1], in
        float64. This draws about ``qN`` numbers per step instead of a mask of ``N`` (at ``N`` = 10M a float64 mask
        is 80 MB and tens of milliseconds per step).
        """
        n, q = self.num_samples, self.sample_rate
        if q >= 1:
            return torch.arange(n)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(mix_seed(_MASK_DOMAIN, self.seed, step))
        log_keep = math.log1p(-q)
        chunk = _gap_draws(n, q)
        parts, last = [], -1.0
        while True:
            v = torch.rand(chunk, generator=gen, dtype=torch.float64).neg_().add_(1.0)  # (0, 1]
            positions = (v.log_().div_(log_keep).floor_().add_(1.0)).cumsum_(0).add_(last)
            inside = positions < n
            parts.append(positions[inside].long())
            if not bool(inside[-1]):
                return torch.cat(parts)
            last = float(positions[-1])

    def __iter__(self) -> Iterator[list[int]]:
        start = self.step_source() if self.step_source is not None else self._next_step
        self._passes += 1
        for k in range(self.steps_per_epoch):
            self._next_step = start + k + 1
            batch = self.global_indices(start + k)[self.rank :: self.world_size].tolist()
            self._sizes.record(start + k, len(batch), self._passes)
            yield batch


def _gap_draws(n: int, q: float) -> int:
    """How many gaps :meth:`PoissonBatchSampler.global_indices` draws at a time: usually all of a step's in one
    draw (the mean ``qN`` plus four standard deviations); the stream, and so the sample, does not depend on it."""
    return int(n * q + 4 * math.sqrt(n * q) + 16)


class OncePerPassBatchSampler(Sampler[list[int]]):
    """The user's batch sampler, unchanged, verified to use every example at most once per pass.

    ``poisson_sampling=False`` accounts each pass over the data (an iteration of this sampler, normally an epoch) as
    one Gaussian release without amplification by sampling: that holds only if no example appears in two batches of
    one pass. This wrapper checks it on the indices as they are yielded and raises before the offending batch
    reaches the model. It also records each batch's size and pass (see :class:`PoissonBatchSampler`).

    Args:
        batch_sampler: the DataLoader's batch sampler (lists of dataset indices).
        num_samples: N, the training set size.
        step_source: returns the key of the first batch of an iteration.
        error: the exception type raised when an example repeats within a pass.
    """

    def __init__(
        self,
        batch_sampler: Any,
        num_samples: int,
        step_source: Callable[[], int],
        error: type[Exception] = ValueError,
    ) -> None:
        self.batch_sampler = batch_sampler
        self.num_samples = int(num_samples)
        self.step_source = step_source
        self.error = error
        self._sizes = SizeRecords()
        self._passes = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def pop_size(self, key: int) -> tuple[int, int] | None:
        return self._sizes.pop(key)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.step_source()
        self._passes += 1
        seen = torch.zeros(self.num_samples, dtype=torch.bool)
        for k, batch in enumerate(self.batch_sampler):
            batch = list(batch)
            try:
                idx = torch.as_tensor(batch, dtype=torch.long).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as err:
                raise self.error(
                    f"poisson_sampling=False needs batches of integer dataset indices, got {batch[:4]!r}..."
                ) from err
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
                raise self.error(f"the batch sampler yielded an index outside the dataset of {self.num_samples}")
            if bool(seen[idx].any()) or idx.unique().numel() != idx.numel():
                raise self.error(
                    f"{type(self.batch_sampler).__name__} yielded an example twice within one pass over the data "
                    "(sampling with replacement, or an oversampling sampler). poisson_sampling=False accounts each "
                    "pass as one release in which every example appears at most once: use a sampler without "
                    "replacement, or Poisson sampling (the default)."
                )
            seen[idx] = True
            self._sizes.record(start + k, len(batch), self._passes)
            yield batch


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
