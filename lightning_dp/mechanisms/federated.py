"""Federated DP-LoRA with client-level differential privacy: the math on plain tensors (no Lightning import).

The protocol (Liu et al., arXiv 2312.17493, made precise): K clients share a frozen base model and train LoRA
adapters. Each round, every client is sampled independently with probability q (Poisson sampling at the client
level, from a secret seed and the round index, so every party agrees without communication). A sampled client starts
from the global adapters θ, runs its local steps on its own data and computes its update ``Δ_k = θ_k − θ`` over all
adapter tensors jointly (every LoRA factor and ``modules_to_save`` copy as one vector). It clips the update,
``Δ_k · min(1, C / ||Δ_k||)``, adds Gaussian noise before the update leaves it, and uploads. The server sums the
uploads and applies ``θ ← θ + η_s · Σ_k upload_k / (q·K)`` (the fixed denominator q·K of DP-FedAvg, McMahan et al.
2018: dividing by the realized number of participants would reveal it).

Noise placement (``placement``):

* ``"local"``: every client adds N(0, σ²C²) to its own upload. Against the server, each upload is a Gaussian
  mechanism on that client's data. The aggregate carries noise of std σC·√K.
* ``"distributed"``: every client adds N(0, σ²C²/K), so the SUM carries exactly σC. This is the noise of a trusted
  central aggregator, split across clients; it protects against the server only if the server sees just the sum
  (secure aggregation, which is not part of this library).

In both placements **every** client uploads every round, and a client that was not sampled (or has no data)
uploads pure noise. The aggregate then always contains a N(0, σ²C²) term whose presence does not depend on who
participated, so the released sum is (a post-processing of) the sampled Gaussian mechanism with rate q and
sensitivity C under adding or removing one client's dataset. That is what the accountant composes over rounds. K is
public and fixed; removing a client's dataset leaves a client without data, which uploads noise only. If only the
sampled clients added noise, a round where nobody else was sampled would release a client's update with less noise
than that analysis assumes.

Aggregation of the factors. LoRA's weight update is a product, ``ΔW = s·B·A``. Averaging the factors,
``avg(B_k)·avg(A_k)``, is not ``avg(B_k·A_k)``: the two differ by the cross term ``avg(δB_k·δA_k) − avg(δB_k)·
avg(δA_k)``, which is second order in the local updates (:func:`lora_product_gap` computes it). ``"factors"`` (the
paper's FedAvg of A and B) accepts that error. ``"b_only"`` (FFA-LoRA, Sun et al. 2024) freezes every A at its shared
initialization and trains only B. The weight update is then linear in what travels, so the average of the uploads is
exactly the average of the clients' weight updates, and the noise enters ``ΔW`` linearly (``N_B·A``) instead of
through the ``N_B·N_A`` product.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from custom_kernels.zo_perturb import mix_seed
from lightning_dp.mechanisms.adapters import AdapterVector, lora_product_gap
from lightning_dp.mechanisms.collective import Collective
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.privacy.sampling import SizeRecords

__all__ = [
    "AdapterVector",
    "ClientSampling",
    "ClientStates",
    "ClientUpload",
    "FederatedAveraging",
    "FederatedBatchSampler",
    "RoundSchedule",
    "aggregate_uploads",
    "client_noise_std",
    "clip_update",
    "local_batch",
    "lora_product_gap",
    "privatize_upload",
    "sample_clients",
    "split_by_label",
    "split_iid",
    "training_loss",
]

PLACEMENTS = ("local", "distributed")
_CLIENT_DOMAIN = 0xC11E  # separates the client-sampling stream from the others derived from the same seed
_BATCH_DOMAIN = 0xBA7C
_SPLIT_DOMAIN = 0x5B11


# ---------------------------------------------------------------------------------------------- sampling
def sample_clients(seed: int, round_index: int, num_clients: int, rate: float) -> Tensor:
    """Poisson sampling of clients: a ``[num_clients]`` bool mask, each client included with probability ``rate``,
    keyed by (secret seed, round), so it is identical for every party and never replayed."""
    if not 0 < rate <= 1:
        raise ValueError(f"client sampling rate must be in (0, 1], got {rate}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(_CLIENT_DOMAIN, seed, round_index))
    return torch.rand(num_clients, generator=gen, dtype=torch.float64) < rate


def local_batch(seed: int, client: int, local_step: int, shard_size: int, batch_size: int, poisson: bool) -> Tensor:
    """Positions (into the client's shard) of the batch of one local step.

    ``poisson=False``: ``min(batch_size, shard_size)`` distinct examples drawn uniformly (client-level DP does not
    depend on how a client batches its own data). ``poisson=True``: each example independently with probability
    ``min(1, batch_size / shard_size)``, as example-level DP-SGD inside the client requires; may be empty.
    """
    if shard_size == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(_BATCH_DOMAIN, seed, client, local_step))
    if poisson:
        q = min(1.0, batch_size / shard_size)
        return (torch.rand(shard_size, generator=gen, dtype=torch.float64) < q).nonzero().flatten()
    return torch.randperm(shard_size, generator=gen)[: min(batch_size, shard_size)].sort().values


def split_iid(num_examples: int, num_clients: int, seed: int) -> list[list[int]]:
    """A uniformly random split of ``range(num_examples)`` into ``num_clients`` shards of (almost) equal size."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(_SPLIT_DOMAIN, seed))
    perm = torch.randperm(num_examples, generator=gen)
    return [sorted(chunk.tolist()) for chunk in torch.tensor_split(perm, num_clients)]


def split_by_label(labels: Sequence[int], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """A non-IID split: the examples of each label are divided among clients in proportions drawn from a
    Dirichlet(``alpha``) distribution (small ``alpha``: each client sees mostly one or two labels; large: IID)."""
    import numpy as np

    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(mix_seed(_SPLIT_DOMAIN, seed, 1))
    labels_arr = np.asarray(labels)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        rng.shuffle(idx)
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].extend(int(i) for i in part)
    return [sorted(s) for s in shards]


@dataclass(frozen=True)
class RoundSchedule:
    """How Lightning steps map onto the protocol: one step is one local step of one virtual client. A rank hosts
    ``clients_per_rank`` clients and runs them one after the other, ``local_steps`` steps each; a round is
    ``clients_per_rank × local_steps`` steps on every rank (so all ranks reach the round's all-reduce together)."""

    clients_per_rank: int
    local_steps: int
    rank: int

    @property
    def steps_per_round(self) -> int:
        return self.clients_per_rank * self.local_steps

    def position(self, global_step: int) -> tuple[int, int, int]:
        """(round, client slot on this rank, local step) of a global step."""
        round_index, within = divmod(int(global_step), self.steps_per_round)
        slot, local = divmod(within, self.local_steps)
        return round_index, slot, local

    def client(self, slot: int) -> int:
        return self.rank * self.clients_per_rank + slot


class ClientSampling:
    """Which clients take part in a round: each client independently with probability ``rate``
    (:func:`sample_clients`, keyed by the secret seed and the round), and never a client without data.

    Args:
        seed: the secret sampling seed.
        num_clients: K.
        rate: q.
        shard_sizes: the number of examples of each client (private: never log or save them).
    """

    def __init__(self, seed: int, num_clients: int, rate: float, shard_sizes: Sequence[int]) -> None:
        if len(shard_sizes) != num_clients:
            raise ValueError(f"{len(shard_sizes)} shard sizes for {num_clients} clients")
        self.seed, self.num_clients, self.rate = int(seed), int(num_clients), float(rate)
        self.shard_sizes = [int(s) for s in shard_sizes]
        self._mask: tuple[int, Tensor] | None = None  # the mask of the last round asked for

    def sampled(self, round_index: int) -> Tensor:
        """The ``[K]`` bool mask of the clients sampled in ``round_index``."""
        if self._mask is None or self._mask[0] != round_index:
            self._mask = (round_index, sample_clients(self.seed, round_index, self.num_clients, self.rate))
        return self._mask[1]

    def participates(self, round_index: int, client: int) -> bool:
        """Sampled this round and holds data (a client without data has nothing to train on)."""
        return bool(self.sampled(round_index)[client]) and self.shard_sizes[client] > 0


class FederatedBatchSampler(Sampler[list[int]]):
    """Per step, the batch (dataset indices) of the virtual client that is active at that step on this rank; an
    empty list when that client is not sampled this round or has no data (the strategy then skips the step).

    One pass (an epoch) is one round. Batches are keyed by (secret seed, client, the client's local step), so a
    prefetched batch never depends on training state.

    The sampler records how many examples each batch it yielded holds, keyed by global step (:meth:`pop_count`):
    the strategy checks per-example losses against that number, not against tensor shapes. The sampler runs in the
    main process (also with DataLoader workers), so the record is there when the step trains. The counts are
    non-private (they reveal the client sampling): they never leave the strategy.
    """

    def __init__(
        self,
        shards: Sequence[Sequence[int]],
        schedule: RoundSchedule,
        batch_size: int,
        participates: Callable[[int, int], bool],
        seed: int,
        poisson: bool,
        step_source: Callable[[], int],
    ) -> None:
        if len(shards) != schedule.clients_per_rank:
            raise ValueError(f"{len(shards)} shards for {schedule.clients_per_rank} hosted clients")
        self.shards = [torch.as_tensor(list(s), dtype=torch.long) for s in shards]
        self.schedule = schedule
        self.batch_size = int(batch_size)
        self.participates = participates
        self.seed = int(seed)
        self.poisson = bool(poisson)
        self.step_source = step_source
        self._counts = SizeRecords()

    def __len__(self) -> int:
        return self.schedule.steps_per_round

    def pop_count(self, global_step: int) -> int | None:
        """The number of examples of the batch yielded for ``global_step`` (``None`` if none was yielded); records
        of earlier steps are dropped."""
        record = self._counts.pop(int(global_step))
        return None if record is None else record[0]

    def batch_at(self, global_step: int) -> list[int]:
        round_index, slot, local = self.schedule.position(global_step)
        client = self.schedule.client(slot)
        shard = self.shards[slot]
        if len(shard) == 0 or not self.participates(round_index, client):
            return []
        step = round_index * self.schedule.local_steps + local
        pos = local_batch(self.seed, client, step, len(shard), self.batch_size, self.poisson)
        return shard[pos].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        start = self.step_source()
        for k in range(len(self)):
            batch = self.batch_at(start + k)
            self._counts.record(start + k, len(batch), 0)
            yield batch


# ---------------------------------------------------------------------------------------------- privatization
@dataclass
class ClientUpload:
    """What one client did in one round: a NON-PRIVATE diagnostic, kept on the client's own rank.

    Every field but ``noise_std`` is a statistic of the client's data or of the secret client sampling
    (``sampled``, ``shard_size``, and above all the norms ``update_norm`` / ``clipped_norm`` of the raw update).
    Never log, report or save them: they are not covered by the privacy guarantee. The strategy keeps them in its
    private ``_round_log`` for tests and debugging only.
    """

    round_index: int
    client: int
    sampled: bool
    shard_size: int
    update_norm: float  # ||Δ_k|| before clipping (0 for a client that did not train)
    clipped_norm: float  # ||clip(Δ_k)||, <= C: what enters the upload before the noise
    noise_std: float  # per-entry std of the noise this client added


def client_noise_std(noise_multiplier: float, clip: float, num_clients: int, placement: str) -> float:
    """Per-entry std of the noise one client adds: σC (``"local"``) or σC/√K (``"distributed"``, so that the sum
    over the K clients carries exactly σC)."""
    if placement == "local":
        return float(noise_multiplier) * float(clip)
    if placement == "distributed":
        return float(noise_multiplier) * float(clip) / math.sqrt(num_clients)
    raise ValueError(f"`noise_placement` must be one of {PLACEMENTS}, got {placement!r}")


def clip_update(delta: Tensor, clip: float) -> tuple[Tensor, float]:
    """``delta · min(1, C / (||delta|| + 1e-6))`` (all tensors jointly: ``delta`` is the flat update) and the norm
    before clipping (computed in float64).

    An update whose norm is not finite (a NaN or inf anywhere, e.g. a client whose local training diverged or whose
    data holds a NaN) gets clip factor 0 and comes back as exact zeros (``0 · NaN`` would be NaN and poison the sum
    of the uploads, and with it the global adapters). The returned norm is then NaN or inf: the caller can tell."""
    norm = float(delta.double().norm())
    if not math.isfinite(norm):
        return torch.zeros_like(delta), norm
    factor = min(1.0, float(clip) / (norm + 1e-6))
    return delta * factor, norm


def privatize_upload(
    delta: Tensor,
    clip: float,
    noise_std: float,
    noise: GaussianNoise,
    participates: bool,
    round_index: int = 0,
    client: int = 0,
    shard_size: int = 0,
) -> tuple[Tensor, ClientUpload]:
    """The upload of one client: ``clip(Δ) + N(0, noise_std²)`` if it took part in the round, else the noise alone
    (see the module docstring for why a client that did not take part still uploads noise). A non-finite update
    contributes nothing but the noise (:func:`clip_update`); ``ClientUpload.update_norm`` is then not finite."""
    if participates:
        upload, norm = clip_update(delta.float(), clip)
        clipped = float(upload.double().norm()) if math.isfinite(norm) else 0.0
    else:
        upload, norm, clipped = torch.zeros(delta.numel(), dtype=torch.float32, device=delta.device), 0.0, 0.0
    if noise_std > 0:
        upload = upload + noise.sample((upload.numel(),), noise_std).to(upload.device)
    return upload, ClientUpload(round_index, client, bool(participates), shard_size, norm, clipped, float(noise_std))


def aggregate_uploads(upload_sum: Tensor, num_clients: int, sample_rate: float) -> Tensor:
    """The server's average: the sum of all uploads divided by the expected number of participants q·K."""
    return upload_sum / (float(sample_rate) * int(num_clients))


# ---------------------------------------------------------------------------------------------- one rank's clients
class ClientStates:
    """What each hosted client keeps between rounds: one state per optimizer (e.g. Adam's moments, a momentum).

    A client's new state is staged when its local steps end and committed when the round ends, so a round cut short
    (:meth:`discard`) leaves no trace of its local steps. The states are functions of each client's raw data: they
    stay with the client (never logged, reported or sent).

    Args:
        clients: the number of clients hosted.
        optimizers: the number of optimizers.
    """

    def __init__(self, clients: int, optimizers: int) -> None:
        self.clients, self.optimizers = int(clients), int(optimizers)
        self._committed: list[list[dict[Any, Any]]] = [[{} for _ in range(optimizers)] for _ in range(clients)]
        self._staged: dict[int, list[dict[Any, Any]]] = {}

    def get(self, slot: int) -> list[dict[Any, Any]]:
        """A copy of the committed states of the client in ``slot`` (the optimizer then updates it in place)."""
        return copy.deepcopy(self._committed[slot])

    def stage(self, slot: int, states: Sequence[Mapping[Any, Any]]) -> None:
        """The client's states after its local steps of the current round."""
        if len(states) != self.optimizers:
            raise ValueError(f"{len(states)} optimizer states for {self.optimizers} optimizers")
        self._staged[slot] = [dict(s) for s in states]

    def commit(self) -> None:
        """The round is released: its staged states become the clients' states."""
        for slot, states in self._staged.items():
            self._committed[slot] = states
        self._staged = {}

    def discard(self) -> None:
        """The round in progress is dropped: its staged states too."""
        self._staged = {}

    def state_dict(self) -> dict[str, Any]:
        """The committed states (never a staged one: a checkpoint mid-round resumes at the round's start)."""
        return {"clients": self.clients, "optimizers": self.optimizers, "states": copy.deepcopy(self._committed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raises:
        ValueError: if ``state`` holds another number of clients or optimizers."""
        if (int(state["clients"]), int(state["optimizers"])) != (self.clients, self.optimizers):
            raise ValueError(
                f"the saved client states are for {state['clients']} clients × {state['optimizers']} optimizers, not "
                f"{self.clients} × {self.optimizers}"
            )
        self._committed = copy.deepcopy(list(state["states"]))
        self._staged = {}


class FederatedAveraging:
    """The protocol of one rank: its hosted clients' uploads and the server's step on the global adapters θ.

    The module's adapters hold θ between clients; a client trains them, :meth:`end_client` turns the difference into
    the client's upload (clipped, noised) and puts θ back. :meth:`end_round` sums the uploads of all ranks and takes
    ``θ ← θ + η_s · Σ / (q·K)``. Nothing leaves a rank before that all-reduce, so a round cut short
    (:meth:`discard_round`) has released nothing.

    Args:
        adapters: the tensors that travel.
        clients_per_rank: the number of clients this rank hosts.
        optimizers: the number of optimizers (one state per optimizer per client).
        num_clients: K, over all ranks.
        client_fraction: q.
        clip: C, the bound on the norm of each client's update.
        server_lr: η_s.
        noise: this rank's private noise generator.
    """

    def __init__(
        self,
        adapters: AdapterVector,
        clients_per_rank: int,
        optimizers: int,
        num_clients: int,
        client_fraction: float,
        clip: float,
        server_lr: float,
        noise: GaussianNoise,
    ) -> None:
        self.adapters = adapters
        self.num_clients, self.client_fraction = int(num_clients), float(client_fraction)
        self.clip, self.server_lr, self.noise = float(clip), float(server_lr), noise
        self.global_adapters = adapters.read()
        self.upload_sum = torch.zeros_like(self.global_adapters)
        self.client_states = ClientStates(clients_per_rank, optimizers)
        self.uploads: list[ClientUpload] = []  # this rank's clients in the current round (private, see ClientUpload)
        self.nonfinite_updates = 0

    @torch.no_grad()
    def end_client(
        self, noise_std: float, participates: bool, round_index: int, client: int, shard_size: int
    ) -> ClientUpload:
        """Clip and noise the client's update ``adapters − θ``, add it to this rank's sum, put θ back."""
        delta = self.adapters.read() - self.global_adapters
        upload, info = privatize_upload(
            delta, self.clip, noise_std, self.noise, participates, round_index, client, shard_size
        )
        if participates and not math.isfinite(info.update_norm):
            self.nonfinite_updates += 1  # its upload is the noise alone (clip factor 0)
        self.upload_sum.add_(upload.to(self.upload_sum.device))
        self.uploads.append(info)
        self.adapters.write_(self.global_adapters)
        return info

    @torch.no_grad()
    def end_round(self, collective: Collective) -> tuple[int, list[ClientUpload]]:
        """One SUM all-reduce of the uploads and the server's step, identical on every rank; the clients' staged
        states are committed. Returns the bytes all-reduced and this rank's (private) uploads of the round."""
        total = collective.all_reduce_sum(self.upload_sum)
        step = aggregate_uploads(total, self.num_clients, self.client_fraction)
        self.global_adapters.add_(step.to(self.global_adapters.device), alpha=self.server_lr)
        self.adapters.write_(self.global_adapters)
        self.upload_sum.zero_()
        self.client_states.commit()
        uploads, self.uploads = self.uploads, []
        return total.numel() * total.element_size(), uploads

    @torch.no_grad()
    def discard_round(self) -> None:
        """The round in progress released nothing: back to θ, its uploads and staged client states dropped."""
        self.adapters.write_(self.global_adapters)
        self.upload_sum.zero_()
        self.uploads = []
        self.client_states.discard()

    @torch.no_grad()
    def load_global_(self, flat: Tensor) -> None:
        """Set θ (and the module's adapters) to ``flat``, e.g. the released adapters of a checkpoint."""
        self.global_adapters.copy_(flat.to(self.global_adapters))
        self.adapters.write_(self.global_adapters)


def training_loss(out: Any) -> Any:
    """Client-level DP needs only a training loss: a ``[B]`` tensor or ``per_sample_loss`` is averaged."""
    if isinstance(out, Tensor) and out.ndim == 1:
        return out.mean()
    if isinstance(out, Mapping) and "loss" not in out and isinstance(out.get("per_sample_loss"), Tensor):
        result = dict(out)
        result["loss"] = result.pop("per_sample_loss").mean()
        return result
    if isinstance(out, Mapping) and "per_sample_loss" in out:
        result = dict(out)
        result.pop("per_sample_loss")
        return result
    return out
