"""``Trainer(strategy=DPLoRAFederatedStrategy(eps=8, clients=4, rounds=20))``: federated LoRA fine-tuning with
client-level differential privacy (DP-LoRA, Liu et al., arXiv 2312.17493, with an explicit privacy unit and
Opacus's accountant)."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dp.mechanisms.buffers import BufferSnapshot
from lightning_dp.mechanisms.collective import LocalCollective, default_collective
from lightning_dp.mechanisms.dpsgd import BookKeepingDPSGD
from lightning_dp.mechanisms.federated import (
    PLACEMENTS,
    AdapterVector,
    ClientUpload,
    FederatedBatchSampler,
    RoundSchedule,
    aggregate_uploads,
    client_noise_std,
    is_lora_a_name,
    is_lora_name,
    privatize_upload,
    sample_clients,
    split_iid,
)
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.mechanisms.per_sample import per_sample_loss
from lightning_dp.privacy.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    default_delta,
    validate_privacy_args,
)
from lightning_dp.privacy.sampling import dataset_size, is_empty_batch, loader_batch_size, poisson_dataloader
from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError

__all__ = ["DPLoRAFederatedStrategy"]

_AGGREGATIONS = ("factors", "b_only")


class DPLoRAFederatedStrategy(DPStrategyBase):
    """Federated LoRA with client-level DP: K clients (institutions) improve one model without sharing data; only
    the adapter tensors travel, each client's update is clipped and noised before it leaves the client, and the
    privacy of the whole run is composed by Opacus's accountant.

    **Guarantee.** The privacy unit is a client's whole dataset. ``privacy_report()["epsilon"]`` is (ε, δ)-DP under
    adding or removing one client's dataset (K is public; a client without data uploads noise only), for anyone who
    sees the global adapters (the released model, other clients, the public): each round is a sampled Gaussian
    mechanism (clients sampled with probability ``client_fraction``, update norm ≤ ``clip``, noise of std σ·C in
    the sum), composed over rounds by the PRV (default) or RDP accountant.
    With ``noise_placement="local"`` each upload also carries σ·C on its own. ``privacy_report()["local_epsilon"]``
    is then the guarantee of a client's uploads against the server that sees them one by one: the client's dataset
    replaced by any other, sensitivity 2C, no sampling amplification, composed over every completed round (the
    data-independent worst case of a client that took part in all of them). With ``"distributed"`` the uploads
    carry σ·C/√K, so the central guarantee needs a trusted aggregator or secure aggregation, and ``local_epsilon`` is
    that of the weaker per-upload noise. Optionally (``example_eps`` or ``example_noise_multiplier``), each client
    trains with DP-SGD (the project's book-keeping mechanism, Poisson batches inside its shard). That adds an
    example-level guarantee against everyone, the server included (``privacy_report()["example_level"]``, worst
    case of the smallest non-empty client dataset taking part in every round, as the calibration assumes); the
    per-example losses are checked against the number of examples the sampler selected for the step.

    **What stays private.** Which clients took part in a round, and how many, is the secret the amplification by
    client sampling rests on; per-client dataset sizes, participation counts and update norms are statistics of
    the clients' data. None of them is logged, reported (``privacy_report()``, the ``PrivacyBudget`` JSON) or saved.
    The per-client records (:class:`~lightning_dp.mechanisms.federated.ClientUpload`, in ``_round_log``) and
    :attr:`nonfinite_updates` are non-private diagnostics for tests and debugging: never log them. A
    ``sampling_seed`` drawn from OS entropy never reaches a checkpoint, and a checkpoint holds only the released
    global adapters and no optimizer state.

    **Protocol.** A Lightning step is one local step of the active virtual client; a round is ``clients_per_rank ×
    local_steps`` steps on every rank (one epoch = one round). Each round, each client is sampled independently with
    probability ``client_fraction`` (a secret seed and the round index; all ranks agree without communication).
    A sampled client starts from the global adapters θ and takes ``local_steps`` steps of your optimizer on batches
    of its shard (``batch_size`` of the DataLoader). Its optimizer state stays with it across rounds. Then
    ``Δ_k = θ_k − θ`` over all adapter tensors jointly is clipped to ``clip`` and noised. Clients that were not
    sampled, or have no data, upload noise only. The uploads of a rank's virtual clients are summed locally. One
    SUM all-reduce of one flat fp32 buffer of the adapter size per round, and ``θ ← θ + server_lr · Σ / (q·K)``,
    identical on every rank. Steps of non-sampled or empty clients run no forward and do not change the model.

    **What travels.** The trainable adapter tensors: LoRA factors and ``modules_to_save`` copies (the classification
    head, if you put it there). Frozen base weights never change and are never sent. At setup, ranks compare a
    SHA-256 fingerprint of their frozen weights and buffers (a few bytes per rank), and rank 0's initial adapters are
    broadcast once (adapter-sized). ``privacy_report()["communication"]`` counts the bytes per round next to what
    full-model federated averaging would send; they are also logged (``federated/*``) at each round end.

    **LoRA.** Pass a LightningModule that already holds a peft model (``get_peft_model``), or ``lora=LoraConfig(...)``
    and the adapters are injected into your module at setup (``peft.inject_adapter_in_model``, before
    ``configure_optimizers`` runs: build the optimizer from ``self.parameters()`` filtered on ``requires_grad``).
    ``aggregation="factors"`` averages A and B (the paper's FedAvg; its error against averaging the products is
    the second-order cross term, see :func:`~lightning_dp.mechanisms.federated.lora_product_gap`). ``"b_only"``
    freezes every ``lora_A`` at its shared random initialization and trains only B (FFA-LoRA), so averaging is exact
    and the noise enters the weight update linearly.

    **Clients and data.** ``clients`` must be a multiple of the number of ranks; rank r hosts clients
    ``r·K/W … (r+1)·K/W − 1``. With ``partition`` (one list of dataset indices per client), every rank holds the
    same training dataset and client k trains on ``partition[k]``: that is simulation on one machine. Without it,
    each rank's training dataset is the data of the clients it hosts (one institution per process or machine),
    split uniformly among its virtual clients.

    **Costs.** Per round and rank, a copy of the adapters and an accumulator (2 × adapter size), per hosted client
    its optimizer state. Compute: only sampled clients run forward/backward. With ``"local"`` noise, the server's
    average carries √K times the noise of ``"distributed"`` (the price of not trusting the aggregator).

    **Refused or unsupported.** Manual optimization, ``accumulate_grad_batches > 1`` (also when a callback changes
    it during training), several training dataloaders, ``gradient_clip_val``, ``16-mixed``, ``limit_train_batches``,
    normalization layers with running statistics (BatchNorm, InstanceNorm with ``track_running_stats``: local,
    unprivatized state) and any buffer that a client's forward changes (refused before that client's update is
    released), a tensor other than the adapters fixed at setup becoming trainable (checked at every step, e.g.
    ``BackboneFinetuning``), a second ``fit`` with the same instance, resuming from a checkpoint (not supported yet).
    A client update that is not finite (NaN/inf) contributes zero (its upload is noise only) and is counted in the
    non-private :attr:`nonfinite_updates`.

    Args:
        eps: target client-level ε; σ is calibrated for the planned number of rounds at rate ``client_fraction``.
        delta: client-level δ; default ``min(1e-5, 1/K^1.1)``, which stays well below 1/K even for a handful of
            clients.
        noise_multiplier: σ instead of ``eps`` (0 gives a non-private run; ε is then reported as infinite).
        clip: C, the bound on the norm of each client's whole adapter update in one round.
        rounds: the number of rounds. Without it, the Trainer's ``max_epochs`` (one epoch = one round) or
            ``max_steps // steps_per_round`` sets the plan. With it, training stops after ``rounds`` rounds.
        local_steps: local optimizer steps per sampled client per round.
        clients: K, the number of clients (default: one per rank).
        client_fraction: q, the probability that a client takes part in a round.
        lora: a ``peft.LoraConfig`` to inject, or ``None`` if the module already holds LoRA adapters.
        aggregation: ``"factors"`` or ``"b_only"``, see above.
        noise_placement: ``"local"`` (default) or ``"distributed"``, see above.
        server_lr: η_s, the step the server takes along the averaged update.
        partition: one sequence of training-dataset indices per client (simulation), or ``None``.
        example_eps / example_noise_multiplier: optional example-level DP-SGD inside each client (target ε,
            calibrated for the worst case of a client sampled in every round with the smallest shard, or σ).
        example_clip: per-example clipping norm of that DP-SGD.
        example_delta: its δ; default ``1 / N^1.1`` with N the total number of examples of all clients.
        accountant, seed, sampling_seed, **kwargs: see :class:`~lightning_dp.strategies.base.DPStrategyBase`
            (``sampling_seed`` keys the client sampling, the local batches and the default split: leave it ``None``
            so that it is a secret drawn from OS entropy and never saved; a seed you pass is saved in checkpoints).
    """

    mechanism_name = "dplora_federated"

    def __init__(
        self,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 1.0,
        rounds: int | None = None,
        local_steps: int = 1,
        clients: int | None = None,
        client_fraction: float = 1.0,
        lora: Any = None,
        aggregation: Literal["factors", "b_only"] = "factors",
        noise_placement: Literal["local", "distributed"] = "local",
        server_lr: float = 1.0,
        partition: Sequence[Sequence[int]] | None = None,
        example_eps: float | None = None,
        example_noise_multiplier: float | None = None,
        example_clip: float = 1.0,
        example_delta: float | None = None,
        accountant: str = "prv",
        seed: int | None = None,
        sampling_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if rounds is not None and not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"`rounds` must be an int >= 1, got {rounds!r}")
        if not (isinstance(local_steps, int) and local_steps >= 1):
            raise ValueError(f"`local_steps` must be an int >= 1, got {local_steps!r}")
        if clients is not None and not (isinstance(clients, int) and clients >= 1):
            raise ValueError(f"`clients` must be an int >= 1, got {clients!r}")
        if not (isinstance(client_fraction, (int, float)) and 0 < client_fraction <= 1):
            raise ValueError(f"`client_fraction` must be in (0, 1], got {client_fraction!r}")
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}")
        if noise_placement not in PLACEMENTS:
            raise ValueError(f"`noise_placement` must be one of {PLACEMENTS}, got {noise_placement!r}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"`server_lr` must be a finite number > 0, got {server_lr!r}")
        self.example_level = example_eps is not None or example_noise_multiplier is not None
        if self.example_level:
            validate_privacy_args(example_eps, example_delta, example_noise_multiplier, accountant)
            if not (math.isfinite(example_clip) and example_clip > 0):
                raise ValueError(f"`example_clip` must be a finite number > 0, got {example_clip!r}")
        elif example_delta is not None:
            raise ValueError("`example_delta` needs `example_eps` or `example_noise_multiplier`")
        if partition is not None and clients is not None and len(partition) != clients:
            raise ValueError(f"`partition` has {len(partition)} shards for clients={clients}")
        super().__init__(
            eps=eps, delta=delta, noise_multiplier=noise_multiplier, clip=clip, accountant=accountant,
            poisson_sampling=True, seed=seed, sampling_seed=sampling_seed, **kwargs,
        )
        self.rounds = rounds
        self.local_steps = local_steps
        self.num_clients = clients if clients is not None else (len(partition) if partition is not None else None)
        self.client_fraction = float(client_fraction)
        self.lora = lora
        self.aggregation = aggregation
        self.noise_placement = noise_placement
        self.server_lr = float(server_lr)
        self.partition = None if partition is None else [list(map(int, s)) for s in partition]
        self.example_target_epsilon = None if example_eps is None else float(example_eps)
        self.example_noise_multiplier = None if example_noise_multiplier is None else float(example_noise_multiplier)
        self.example_clip = float(example_clip)
        self.example_delta = None if example_delta is None else float(example_delta)
        # per-fit state
        self.schedule: RoundSchedule | None = None
        self.adapters: AdapterVector | None = None
        self.planned_rounds: int | None = None
        self.rounds_completed = 0
        self.batch_size: int | None = None
        self.communication: dict[str, Any] = {}
        self.nonfinite_updates = 0
        """NON-PRIVATE diagnostic: how many uploads of this rank's clients had a non-finite update (NaN/inf) and
        contributed zero instead (noise only). It depends on the clients' data: never log, report or save it."""
        # private, per-client state: statistics of the clients' data or of the secret client sampling. Never logged,
        # reported or saved (see `ClientUpload`).
        self._shard_sizes: list[int] | None = None
        self._round_log: list[dict[str, Any]] = []  # per completed round: this rank's `ClientUpload`s
        self._uploads: list[ClientUpload] = []  # this rank's clients in the current round
        self._sampler: FederatedBatchSampler | None = None
        self._buffers: BufferSnapshot | None = None
        self._global: Tensor | None = None
        self._upload_sum: Tensor | None = None
        self._client_optimizer_states: list[list[dict | None]] = []
        self._adapters_injected = False
        self._fitted = False
        self._step_kind = "skip"
        self._losses: Tensor | None = None
        self._dpsgd: BookKeepingDPSGD | None = None
        self._dpsgd_verify = True
        self._sampled_cache: dict[int, Tensor] = {}
        self._epsilon_cache: dict[tuple, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any) -> None:
        """Like :meth:`DPStrategyBase.setup`, without its broadcast of the whole model: the frozen base must never
        travel, so ranks compare its fingerprint instead and only the adapters are broadcast."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            if self._fitted:
                raise UnsafeSettingError(
                    "a DPLoRAFederatedStrategy trains once (its rounds, client sampling and accounting belong to one "
                    "fit): create a new strategy for another fit, and add the privacy spends of both runs"
                )
            self._fitted = True
            self._refuse_unsafe_settings(trainer)
            if trainer.limit_train_batches not in (1.0, None):
                raise UnsafeSettingError(
                    "`limit_train_batches` would cut rounds short; DPLoRAFederatedStrategy plans whole rounds "
                    "(one epoch = one round). Use `rounds=` or `max_epochs` instead."
                )
            self._prepare_adapters(trainer.lightning_module)
        Strategy.setup(self, trainer)
        if not fitting:
            return
        self._collective = default_collective()
        self._noise = GaussianNoise(self.root_device)
        self.seed = int(self.broadcast(secrets.randbits(62) if self.seed is None else self.seed))
        self._draw_sampling_seed({})  # secret unless the user passed one; the base's dp_state_dict never saves it
        self.setup_mechanism(trainer)

    def _prepare_adapters(self, module: nn.Module) -> None:
        """Inject ``lora`` (once), and under ``"b_only"`` freeze the A factors, before the optimizers are built."""
        has_lora = any(is_lora_name(n) for n, _ in module.named_parameters())
        if self.lora is not None and not self._adapters_injected:
            if has_lora:
                raise UnsafeSettingError(
                    "the module already holds LoRA adapters and `lora=` asks to inject more: pass `lora=None` to "
                    "federate the adapters it has"
                )
            from peft import inject_adapter_in_model

            inject_adapter_in_model(self.lora, module)
            self._adapters_injected = True
        elif not has_lora:
            raise UnsafeSettingError(
                "DPLoRAFederatedStrategy found no LoRA adapter in the module: pass `lora=peft.LoraConfig(...)` or a "
                "module holding a peft model (`peft.get_peft_model`)"
            )
        if self.aggregation == "b_only":
            for name, p in module.named_parameters():
                if is_lora_a_name(name):
                    p.requires_grad_(False)

    def setup_mechanism(self, trainer: Any) -> None:
        module = self.lightning_module
        assert self._collective is not None
        world = self.world_size
        if self.num_clients is None:
            self.num_clients = world
        if self.num_clients % world:
            raise UnsafeSettingError(
                f"clients={self.num_clients} is not a multiple of the {world} ranks: every rank must host the same "
                "number of clients (so all ranks reach each round's all-reduce together)"
            )
        self._refuse_data_dependent_buffers(module, "each client's statistics would be neither federated nor noised")
        self.schedule = RoundSchedule(self.num_clients // world, self.local_steps, self.global_rank)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise UnsafeSettingError("the module has no trainable adapter tensor: nothing to federate")
        names = {id(p) for _, p in trainable}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in names:  # pragma: no cover - defensive
                        raise UnsafeSettingError("an optimizer holds a trainable parameter that is not in the module")
        self.adapters = AdapterVector(trainable)
        lora_all = [(n, p) for n, p in module.named_parameters() if is_lora_name(n)]
        frozen = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())
                  if not is_lora_name(n) and not (isinstance(t, nn.Parameter) and t.requires_grad)]
        self._check_same_base(frozen)
        self._broadcast_from_rank0([p for _, p in lora_all] + [p for n, p in trainable if not is_lora_name(n)])
        self._global = self.adapters.read()
        self._upload_sum = torch.zeros_like(self._global)
        self._client_optimizer_states = [[None] * len(self.optimizers) for _ in range(self.schedule.clients_per_rank)]
        self.rounds_completed = 0
        self.nonfinite_updates = 0
        self._round_log = []
        self._uploads = []
        self._sampled_cache = {}
        self._buffers = None
        if self.example_level:
            self._dpsgd = BookKeepingDPSGD(module, self.example_clip)
            self._dpsgd_verify = True
        full = [p for n, p in module.named_parameters() if not is_lora_name(n)]
        upload = self.adapters.numel * 4  # one flat fp32 buffer
        full_bytes = sum(p.numel() * p.element_size() for p in full)
        self.communication = {
            "adapter_tensors": len(self.adapters.names),
            "adapter_parameters": self.adapters.numel,
            "full_model_parameters": sum(p.numel() for p in full),
            "upload_bytes_per_client": upload,
            "allreduce_bytes_per_rank": upload,
            "upload_bytes_per_round": upload * self.num_clients,
            "full_model_bytes_per_client": full_bytes,
            "full_model_bytes_per_round": full_bytes * self.num_clients,
            "ratio_full_to_adapter": full_bytes / upload,
            "allreduce_bytes_total": 0,
        }

    def _check_same_base(self, frozen: list[tuple[str, Tensor]]) -> None:
        digest = hashlib.sha256()
        for name, t in frozen:
            digest.update(name.encode())
            digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        mine = int.from_bytes(digest.digest()[:7], "little")
        assert self._collective is not None
        reference = self._collective.broadcast_int(mine)
        mismatch = torch.tensor([float(mine != reference)], device=self.root_device)
        self._collective.all_reduce_sum(mismatch)
        if mismatch.item() > 0:
            raise UnsafeSettingError(
                f"the frozen base weights differ across ranks ({int(mismatch.item())} rank(s) differ from rank 0): "
                "every client must start from the same base model (they are never sent)"
            )

    @torch.no_grad()
    def _broadcast_from_rank0(self, params: list[Tensor]) -> None:
        """Rank 0's initial adapters to every rank, through the SUM all-reduce (others contribute zeros)."""
        assert self._collective is not None
        if self._collective.world_size <= 1 or not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        if self._collective.rank != 0:
            flat.zero_()
        self._collective.all_reduce_sum(flat)
        for p, chunk in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.copy_(chunk.view(p.shape))

    # ------------------------------------------------------------------ data and privacy plan
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"DPLoRAFederatedStrategy needs a torch DataLoader for training, got {type(dataloader)}")
        assert self.schedule is not None and self.num_clients is not None and self._collective is not None
        n = dataset_size(dataloader)
        self.batch_size = loader_batch_size(dataloader)
        cpr = self.schedule.clients_per_rank
        hosted = [self.schedule.client(j) for j in range(cpr)]
        if self.partition is not None:
            if len(self.partition) != self.num_clients:
                raise ValueError(f"`partition` has {len(self.partition)} shards for {self.num_clients} clients")
            for k, shard in enumerate(self.partition):
                if shard and (min(shard) < 0 or max(shard) >= n):
                    raise ValueError(f"`partition[{k}]` holds an index outside the training dataset of {n} examples")
            shards = [self.partition[k] for k in hosted]
        else:
            shards = split_iid(n, cpr, self.sampling_seed)
        sizes = torch.zeros(self.num_clients, dtype=torch.float64, device=self.root_device)
        for k, shard in zip(hosted, shards):
            sizes[k] = len(shard)
        self._collective.all_reduce_sum(sizes)  # shard sizes of all clients (K numbers, for the accounting)
        self._shard_sizes = [int(s) for s in sizes.tolist()]
        self.dataset_size = sum(self._shard_sizes)
        self._sampler = FederatedBatchSampler(
            shards, self.schedule, self.batch_size, self._participates, self.sampling_seed, self.example_level,
            step_source=lambda: trainer.global_step,
        )
        self._configure_federated_privacy(trainer)
        return poisson_dataloader(dataloader, self._sampler)

    def _configure_federated_privacy(self, trainer: Any) -> None:
        assert self.schedule is not None and self.num_clients is not None and self._shard_sizes is not None
        spr = self.schedule.steps_per_round
        planned = self._planned_steps(trainer, spr)
        trainer_rounds = None if planned is None else planned // spr
        if self.rounds is not None:
            self.planned_rounds = self.rounds if trainer_rounds is None else min(self.rounds, trainer_rounds)
        elif trainer_rounds is None:
            raise UnsafeSettingError(
                "DPLoRAFederatedStrategy needs a planned number of rounds: pass `rounds=` or set `max_epochs` (one "
                "epoch = one round) or `max_steps` on the Trainer"
            )
        else:
            self.planned_rounds = trainer_rounds
        if self.planned_rounds < 1:
            raise UnsafeSettingError(
                f"the Trainer would not complete a single round ({spr} steps per round = clients per rank × "
                f"local_steps): raise `max_steps`/`max_epochs`"
            )
        self.planned_steps = self.planned_rounds * spr
        self.sample_rate = self.client_fraction
        self.expected_batch_size = self.client_fraction * self.num_clients  # expected participants per round
        if self.delta is None:
            self.delta = min(1e-5, default_delta(self.num_clients))
        if self.target_epsilon is not None:
            self.noise_multiplier = calibrate_noise_multiplier(
                self.target_epsilon, self.delta, self.sample_rate, self.planned_rounds, self.accountant.kind
            )
        if self.example_level:
            nonempty = [s for s in self._shard_sizes if s > 0]
            if not nonempty:
                raise UnsafeSettingError("every client shard is empty: no data to train on")
            if self.example_delta is None:
                self.example_delta = default_delta(self.dataset_size)
            if self.example_target_epsilon is not None:
                q_max = min(1.0, self.batch_size / min(nonempty))
                self.example_noise_multiplier = calibrate_noise_multiplier(
                    self.example_target_epsilon, self.example_delta, q_max, self.planned_rounds * self.local_steps,
                    self.accountant.kind,
                )

    def _sampled(self, round_index: int) -> Tensor:
        mask = self._sampled_cache.get(round_index)
        if mask is None:
            assert self.num_clients is not None and self.sampling_seed is not None
            mask = sample_clients(self.sampling_seed, round_index, self.num_clients, self.client_fraction)
            self._sampled_cache = {round_index: mask}
        return mask

    def _participates(self, round_index: int, client: int) -> bool:
        """Sampled this round and holds data (a client without data has nothing to train on)."""
        assert self._shard_sizes is not None
        return bool(self._sampled(round_index)[client]) and self._shard_sizes[client] > 0

    # ------------------------------------------------------------------ the step: one local step of one client
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """One local step of the active client. First, before any forward: the per-step invariants (gradient
        accumulation, one training dataloader), the set of trainable tensors (exactly the federated adapters), the
        number of examples the sampler selected for this step, and (once) a snapshot of every buffer."""
        assert self.schedule is not None
        trainer = self.lightning_module.trainer
        self._check_step_invariants(trainer)
        self._check_trainable_set()
        round_index, slot, _ = self.schedule.position(trainer.global_step)
        batch = args[0] if args else kwargs.get("batch")
        examples = self._examples_of_step(trainer.global_step, batch)
        zero = {"loss": torch.zeros((), device=self.root_device)}
        self._losses = None
        if not self._participates(round_index, self.schedule.client(slot)):
            self._step_kind = "skip"
            return zero
        if examples and self._buffers is None:  # the first step that runs a forward
            self._buffers = BufferSnapshot(self.lightning_module)
        if self.example_level:
            self._step_kind = "dpsgd"
            if examples == 0:  # an empty Poisson batch is still a DP-SGD step (noise only)
                return zero
            assert self._dpsgd is not None
            size = examples  # what the sampler selected, not what the batch's tensors suggest
            self._dpsgd.reset()
            self._dpsgd.batch_size = size
            self._dpsgd.capturing = True
            try:
                out = super().training_step(*args, **kwargs)
            finally:
                self._dpsgd.capturing = False
            self._losses = per_sample_loss(out, size)
            result = dict(out) if isinstance(out, Mapping) else {}
            result.pop("per_sample_loss", None)
            result["loss"] = self._losses.detach().float().mean()
            return result
        self._step_kind = "plain"
        out = super().training_step(*args, **kwargs)
        return _as_scalar_loss(out)

    def _examples_of_step(self, global_step: int, batch: Any) -> int:
        """The number of examples the federated sampler selected for this step's batch (0: empty or skipped)."""
        count = None if self._sampler is None else self._sampler.pop_count(global_step)
        if count is None:
            raise UnsafeSettingError(
                f"the batch of step {global_step} was not drawn by DPLoRAFederatedStrategy's client sampler: its "
                "number of examples, which the per-example contract and the round schedule rely on, is unknown. "
                "Every batch must be one optimizer step (never return None from `training_step`), and the training "
                "DataLoader must be the one passed to `trainer.fit` (not replaced or iterated outside the Trainer)."
            )
        if is_empty_batch(batch) != (count == 0):
            raise RuntimeError(f"internal error: the sampler selected {count} examples for the batch of step "
                               f"{global_step}, which does not match the batch received")
        return count

    def _check_trainable_set(self) -> None:
        """Exactly the adapters fixed at setup are trainable (in the module and in every optimizer): a tensor made
        trainable later (``BackboneFinetuning``, a callback unfreezing layers) would be trained on each client's
        raw data and never clipped, noised or aggregated."""
        assert self.adapters is not None
        module = self.lightning_module
        adapters = {id(p) for p in self.adapters.params}
        names = {id(p): n for n, p in module.named_parameters()}
        problems = [f"{n} (requires_grad in the module)" for n, p in module.named_parameters()
                    if p.requires_grad and id(p) not in adapters]
        problems += [f"{n} (an adapter that stopped requiring grad)"
                     for n, p in zip(self.adapters.names, self.adapters.params) if not p.requires_grad]
        seen = set()
        for i, optimizer in enumerate(self.optimizers):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in adapters and id(p) not in seen:
                        seen.add(id(p))
                        what = names.get(id(p), f"a parameter of shape {tuple(p.shape)} outside the module")
                        problems.append(f"{what} (trainable in optimizer {i})")
        if problems:
            raise UnsafeSettingError(
                f"the trainable tensors changed after setup: {', '.join(problems)}. DPLoRAFederatedStrategy "
                f"federates exactly the {len(self.adapters.names)} adapter tensors fixed at setup; anything else "
                "trained would learn from each client's raw data without clipping, noise or aggregation. Keep other "
                "parameters frozen (`requires_grad=False`, out of the optimizer: no BackboneFinetuning or callback "
                "that unfreezes layers), or make them trainable before `fit` (e.g. LoRA `modules_to_save`) so they "
                "travel with the adapters."
            )

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self._step_kind == "skip":
            return closure_loss  # no data this step: no backward, gradients stay None, the optimizer does nothing
        if self._step_kind == "plain":
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        return self._dpsgd_backward(closure_loss, optimizer, *args, **kwargs)

    def _dpsgd_backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Example-level DP-SGD inside the active client: the clipped, noised gradient (noise from this rank's
        private generator, once per client step) divided by the client's expected batch size."""
        assert self._dpsgd is not None and self.schedule is not None and self._shard_sizes is not None
        module = self.lightning_module
        self.pre_backward(closure_loss)
        self._dpsgd.clear_grads()
        batch = 0
        reference = None
        if self._losses is not None:
            batch = int(self._losses.shape[0])
            self.precision_plugin.pre_backward(self._losses.sum(), module)  # on_before_backward hooks
            # the first step checks the hooks against an ordinary backward; later ones stop at the hooked outputs
            reference = self._dpsgd.backward(self._losses, verify=self._dpsgd_verify)
            self._dpsgd_verify = False
            self._dpsgd.clear_grads()
        self._losses = None
        _, slot, _ = self.schedule.position(module.trainer.global_step)
        shard = self._shard_sizes[self.schedule.client(slot)]
        q = min(1.0, self.batch_size / shard)
        std = float(self.example_noise_multiplier) * self.example_clip
        flat, _ = self._dpsgd.private_sum(batch, std, LocalCollective(), self.root_device, reference_grads=reference)
        self._dpsgd.write_grads(flat, 1.0 / (q * shard))
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        assert self.schedule is not None
        trainer = self.lightning_module.trainer
        round_index, slot, local = self.schedule.position(trainer.global_step)
        if local == 0:
            self._load_client_optimizer_state(slot)
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if local == self.local_steps - 1:
            self._end_client(round_index, slot)
            if slot == self.schedule.clients_per_rank - 1:
                self._end_round(round_index, trainer)
        return out

    # ------------------------------------------------------------------ client and round boundaries
    def _load_client_optimizer_state(self, slot: int) -> None:
        for i, optimizer in enumerate(self.optimizers):
            state = optimizer.state_dict()
            state["state"] = self._client_optimizer_states[slot][i] or {}
            optimizer.load_state_dict(state)

    @torch.no_grad()
    def _end_client(self, round_index: int, slot: int) -> None:
        """Refuse any buffer the client's forwards changed, then clip and noise the client's update, add it to
        this rank's sum, and reset the adapters to the global ones for the next client."""
        assert self.adapters is not None and self._global is not None and self._upload_sum is not None
        assert self.schedule is not None and self._shard_sizes is not None and self._noise is not None
        self._check_buffers()
        client = self.schedule.client(slot)
        for i, optimizer in enumerate(self.optimizers):
            self._client_optimizer_states[slot][i] = optimizer.state_dict()["state"]
        delta = self.adapters.read() - self._global
        std = client_noise_std(self.noise_multiplier, self.clip, self.num_clients, self.noise_placement)
        participates = self._participates(round_index, client)
        upload, info = privatize_upload(
            delta, self.clip, std, self._noise, participates, round_index, client, self._shard_sizes[client],
        )
        if participates and not math.isfinite(info.update_norm):
            self.nonfinite_updates += 1  # its upload is the noise alone (clip factor 0)
        self._upload_sum.add_(upload.to(self._upload_sum.device))
        self._uploads.append(info)
        self.adapters.write_(self._global)

    def _check_buffers(self) -> None:
        """Before a client's update is released: every buffer must be as it was before the first forward (a buffer
        written from the client's data, e.g. by a custom module, would be an un-noised statistic of that data)."""
        if self._buffers is not None:
            self._refuse_changed_buffers(self._buffers, "the forward pass of a client's local steps")

    @torch.no_grad()
    def _end_round(self, round_index: int, trainer: Any) -> None:
        """One SUM all-reduce of the uploads, the server's averaged step, identical on every rank."""
        assert self._collective is not None and self._upload_sum is not None and self._global is not None
        assert self.adapters is not None and self.num_clients is not None
        total = self._collective.all_reduce_sum(self._upload_sum)
        self.communication["allreduce_bytes_total"] += total.numel() * total.element_size()
        self._global.add_(aggregate_uploads(total, self.num_clients, self.client_fraction), alpha=self.server_lr)
        self.adapters.write_(self._global)
        self._upload_sum.zero_()
        self.account_step()
        self.rounds_completed += 1
        # private (see `ClientUpload`): which clients took part is the secret the client sampling amplifies with
        self._round_log.append({"round": round_index, "uploads": self._uploads,
                                "allreduce_bytes": total.numel() * total.element_size()})
        self._uploads = []
        metrics = {  # public only: never who or how many took part, shard sizes or update norms
            "federated/round": float(round_index),
            "federated/upload_bytes_per_round": float(self.communication["upload_bytes_per_round"]),
            "federated/full_model_bytes_per_round": float(self.communication["full_model_bytes_per_round"]),
        }
        if self.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.rounds is not None and self.rounds_completed >= self.planned_rounds:
            trainer.should_stop = True

    def _discard_partial_round(self) -> None:
        """A round cut short (``max_steps`` mid-round, an exception) releases nothing: back to the global adapters."""
        if self.adapters is not None and self._global is not None:
            self.adapters.write_(self._global)
            if self._upload_sum is not None:
                self._upload_sum.zero_()
            self._uploads = []

    def on_train_end(self) -> None:
        self._discard_partial_round()
        super().on_train_end()

    def on_validation_start(self) -> None:
        """Validation in the middle of a round sees the released global adapters, never a client's local ones
        (their metrics would be an un-noised function of that client's data)."""
        self._local_during_validation = None
        if self.adapters is not None and self._global is not None:
            self._local_during_validation = self.adapters.read()
            self.adapters.write_(self._global)
        super().on_validation_start()

    def on_validation_end(self) -> None:
        local, self._local_during_validation = getattr(self, "_local_during_validation", None), None
        if local is not None and self.adapters is not None:
            self.adapters.write_(local)
        super().on_validation_end()

    def on_exception(self, exception: BaseException) -> None:
        if self._dpsgd is not None:
            self._dpsgd.capturing = False
            self._dpsgd.reset()
        self._discard_partial_round()
        super().on_exception(exception)

    def teardown(self) -> None:
        if self._dpsgd is not None:
            self._dpsgd.remove_hooks()
            self._dpsgd = None
        super().teardown()

    # ------------------------------------------------------------------ accounting and report
    def local_epsilon(self) -> float:
        """ε of one client's uploads against the server that sees them one by one: the client's dataset replaced by
        any other, so sensitivity 2C against per-upload noise σC (``"local"``) or σC/√K (``"distributed"``), no
        sampling amplification. Data-independent worst case: a client that took part in every completed round
        (which rounds a client actually took part in is secret, the client sampling's amplification rests on it,
        so it is never used here)."""
        if self.delta is None or self.noise_multiplier is None or not self.rounds_completed:
            return 0.0
        per_upload = client_noise_std(self.noise_multiplier, 1.0, self.num_clients, self.noise_placement)
        return self._composed_epsilon(per_upload / 2.0, 1.0, self.rounds_completed, self.delta)

    def example_epsilon(self) -> float:
        """Example-level ε inside each client, from its DP-SGD steps so far. Data-independent worst case, the one
        the calibration assumes: a client that took part in every completed round (``local_steps`` DP-SGD steps
        each) with the smallest non-empty dataset (the highest Poisson rate ``batch_size / N_k``)."""
        if not self.example_level or self.example_delta is None or not self.rounds_completed:
            return 0.0
        assert self._shard_sizes is not None and self.batch_size is not None
        smallest = min((size for size in self._shard_sizes if size > 0), default=0)
        if not smallest:
            return 0.0
        return self._composed_epsilon(self.example_noise_multiplier, min(1.0, self.batch_size / smallest),
                                      self.rounds_completed * self.local_steps, self.example_delta)

    def _composed_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε of ``steps`` releases at (σ, q) by this run's accountant kind (cached: PRV costs tens of ms)."""
        key = (noise_multiplier, sample_rate, steps, delta)
        if key not in self._epsilon_cache:
            acc = PrivacyAccountant(self.accountant.kind)
            acc.step(noise_multiplier, sample_rate, steps)
            self._epsilon_cache[key] = acc.epsilon(delta)
        return self._epsilon_cache[key]

    def privacy_report(self) -> dict[str, Any]:
        """Which unit, which guarantee, against whom, and the communication cost.

        Everything in it is a function of public settings and of the number of completed rounds: never which or
        how many clients took part in a round, per-client dataset sizes or participation counts, or update norms
        (the per-client ε are data-independent worst cases). It is written to JSON by ``PrivacyBudget``."""
        trust = {
            "local": "each client noises its own upload (σC): the guarantee holds against the server and anyone "
                     "who sees the global adapters",
            "distributed": "the noise is split across clients so that the sum carries σC: the central guarantee "
                           "needs a trusted aggregator or secure aggregation (the server must see only the sum)",
        }[self.noise_placement]
        report = {
            "mechanism": self.mechanism_name,
            "privacy_unit": "client",
            "guarantee": "client-level (ε, δ)-DP of the global adapters under adding/removing one client's whole "
                         "dataset; sampled Gaussian mechanism per round composed by the accountant",
            "trust_model": trust,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.accountant.steps,
            "rounds": self.rounds_completed,
            "planned_rounds": self.planned_rounds,
            "accountant": self.accountant.kind,
            "clip": self.clip,
            "clients": self.num_clients,
            "client_fraction": self.client_fraction,
            "local_steps": self.local_steps,
            "noise_placement": self.noise_placement,
            "aggregation": self.aggregation,
            "local_epsilon": self.local_epsilon(),
            "local_guarantee": "ε of one client's uploads against the server (sensitivity 2C, no amplification by "
                               "client sampling), worst case of a client that took part in every completed round",
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
            "communication": dict(self.communication),
            "example_level": None,
        }
        if self.example_level:
            report["example_level"] = {
                "privacy_unit": "example",
                "guarantee": "example-level (ε, δ)-DP of each client's uploads, against everyone including the server "
                             "(DP-SGD with Poisson batches inside each client); worst case of a client with the "
                             "smallest non-empty dataset that took part in every completed round",
                "epsilon": self.example_epsilon(),
                "delta": self.example_delta,
                "target_epsilon": self.example_target_epsilon,
                "noise_multiplier": self.example_noise_multiplier,
                "clip": self.example_clip,
                "batch_size": self.batch_size,
            }
        return report

    def epsilon_after(self, extra_steps: int) -> float:
        """Client-level ε after ``extra_steps`` more Lightning steps (rounds completed within them are counted)."""
        if self.delta is None or self.noise_multiplier is None or self.schedule is None:
            return 0.0
        trainer = self.lightning_module.trainer
        done = (trainer.global_step + extra_steps) // self.schedule.steps_per_round - self.rounds_completed
        return self.accountant.epsilon(self.delta, (self.noise_multiplier, self.sample_rate, max(0, done)))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Only released state goes into a checkpoint: the global adapters (mid-round, the module holds a client's
        local, un-noised adapters) and no optimizer state (the optimizer holds the last client's state, e.g. a
        momentum that sums its raw gradients; resuming is not supported, so nothing needs it)."""
        if self.adapters is not None and self._global is not None:
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                chunks = torch.split(self._global, self.adapters.sizes)
                for name, param, chunk in zip(self.adapters.names, self.adapters.params, chunks):
                    if name not in state:
                        raise UnsafeSettingError(
                            f"the adapter tensor {name} is not in the checkpoint's state_dict, so its local (client) "
                            "value could not be replaced by the released global one; save the checkpoint from the "
                            "Trainer (`trainer.save_checkpoint`, ModelCheckpoint)"
                        )
                    state[name] = chunk.view(param.shape).to(dtype=param.dtype, device=state[name].device).clone()
            for opt_state in checkpoint.get("optimizer_states", []) or []:
                if isinstance(opt_state, dict):
                    opt_state["state"] = {}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # DP state: dp_state_dict

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        raise UnsafeSettingError(
            "resuming a DPLoRAFederatedStrategy run is not supported: the per-client optimizer states and the "
            "round in progress are not saved. Start a new run (its privacy spend adds to the old one's)."
        )


def _as_scalar_loss(out: Any) -> Any:
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
