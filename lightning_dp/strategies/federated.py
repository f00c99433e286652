"""``Trainer(strategy=DPLoRAFederatedStrategy(eps=8, clients=4, rounds=20))``: federated LoRA fine-tuning with
client-level differential privacy (DP-LoRA, Liu et al., arXiv 2312.17493, with an explicit privacy unit and
Opacus's accountant). The protocol's math is in :mod:`lightning_dp.mechanisms.federated`,
:mod:`lightning_dp.mechanisms.adapters` and :mod:`lightning_dp.mechanisms.federated_accounting`; this module maps
Lightning's hooks onto it."""

from __future__ import annotations

import math
import secrets
import weakref
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dp.mechanisms.adapters import AdapterVector, adapter_parameters, fingerprint, lora_a_parameters
from lightning_dp.mechanisms.buffers import BufferSnapshot
from lightning_dp.mechanisms.collective import LocalCollective, default_collective
from lightning_dp.mechanisms.dpsgd import BookKeepingDPSGD
from lightning_dp.mechanisms.federated import (
    PLACEMENTS,
    ClientSampling,
    FederatedAveraging,
    FederatedBatchSampler,
    RoundSchedule,
    client_noise_std,
    split_iid,
    training_loss,
)
from lightning_dp.mechanisms.federated_accounting import FederatedAccounting
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.mechanisms.per_sample import per_sample_loss
from lightning_dp.privacy.accounting import calibrate_noise_multiplier, default_delta, validate_privacy_args
from lightning_dp.privacy.sampling import dataset_size, is_empty_batch, loader_batch_size, poisson_dataloader
from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError

__all__ = ["DPLoRAFederatedStrategy"]

_AGGREGATIONS = ("factors", "b_only")
_CLIENTS_FILE_VERSION = 1
# what a resumed run must share with the checkpoint's run (the round schedule, the mechanism and its accounting)
_RESUME_SETTINGS = ("clients", "client_fraction", "local_steps", "aggregation", "noise_placement", "world_size",
                    "example_level", "example_clip")


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
    ``sampling_seed`` drawn from OS entropy never reaches a checkpoint.

    **Protocol.** A Lightning step is one local step of the active virtual client; a round is ``clients_per_rank ×
    local_steps`` steps on every rank (one epoch = one round). Each round, each client is sampled independently with
    probability ``client_fraction`` (a secret seed and the round index; all ranks agree without communication).
    A sampled client starts from the global adapters θ and takes ``local_steps`` steps of your optimizer on batches
    of its shard (``batch_size`` of the DataLoader). Its optimizer state stays with it across rounds. Then
    ``Δ_k = θ_k − θ`` over all adapter tensors jointly is clipped to ``clip`` and noised. Clients that were not
    sampled, or have no data, upload noise only. The uploads of a rank's virtual clients are summed locally. One
    SUM all-reduce of one flat fp32 buffer of the adapter size per round, and ``θ ← θ + server_lr · Σ / (q·K)``,
    identical on every rank. Steps of non-sampled or empty clients run no forward and do not change the model.

    **What travels.** The trainable tensors, which must be peft's adapter tensors (found through peft's layer
    classes): LoRA factors and ``modules_to_save`` copies (the classification head, if you put it there). Frozen
    base weights never change and are never sent. At setup, ranks compare a SHA-256 fingerprint of their frozen
    weights and buffers (a few bytes per rank), and rank 0's initial adapters are broadcast once (adapter-sized).
    ``privacy_report()["communication"]`` counts the bytes per round next to what full-model federated averaging
    would send; they are also logged (``federated/*``) at each round end.

    **LoRA.** Pass a LightningModule that already holds a peft model (``get_peft_model``), or ``lora=LoraConfig(...)``
    and the adapters are injected into your module when the Trainer attaches it (``peft.inject_adapter_in_model``,
    before a checkpoint is loaded and before ``configure_optimizers`` runs: build the optimizer from
    ``self.parameters()`` filtered on ``requires_grad``). ``aggregation="factors"`` averages A and B (the paper's
    FedAvg; its error against averaging the products is the second-order cross term, see
    :func:`~lightning_dp.mechanisms.adapters.lora_product_gap`). ``"b_only"`` freezes every ``lora_A`` at its shared
    random initialization and trains only B (FFA-LoRA), so averaging is exact and the noise enters the weight update
    linearly.

    **Clients and data.** ``clients`` must be a multiple of the number of ranks; rank r hosts clients
    ``r·K/W … (r+1)·K/W − 1``. With ``partition`` (one list of dataset indices per client), every rank holds the
    same training dataset and client k trains on ``partition[k]``: that is simulation on one machine. Without it,
    each rank's training dataset is the data of the clients it hosts (one institution per process or machine),
    split uniformly among its virtual clients by the public ``seed`` (so a resumed run keeps every client's data).

    **Checkpoints and resuming.** A checkpoint holds only released state: the global adapters (mid-round, the
    module holds a client's local, un-noised adapters: they are replaced), no optimizer state, and the public DP
    state (the accountant, the completed rounds, the settings). What each client keeps between rounds (its optimizer
    state, e.g. a momentum: a sum of its raw gradients) stays with the rank that hosts it: every rank writes its
    clients' states to ``<checkpoint>.clients-<rank>-of-<world size>`` beside the checkpoint (removed with it by
    ``ModelCheckpoint``). Like the clients' data, never release those files. ``trainer.fit(model, ckpt_path=...)``
    resumes with the same number of ranks: the round index, the global adapters, the clients' states and the
    accountant continue (ε adds up), and a fresh secret sampling seed is drawn. Resuming with other ``clients``,
    ``client_fraction``, ``clip``, ``local_steps``, ``aggregation``, ``noise_placement``, example-level settings
    or number of ranks is refused; keep the same data and ``partition`` (not checked: per-client sizes are private).
    A checkpoint written in the middle of a round resumes at the start of that round: the partial round is
    discarded (nothing of it was released: uploads leave a rank only at the round's all-reduce, and the clients'
    states saved are those of the last completed round), so the rounds then no longer align with epochs.
    ``trainer.validate``/``test(model, ckpt_path=...)`` evaluate a checkpoint's global adapters.

    **Costs.** Per round and rank, a copy of the adapters and an accumulator (2 × adapter size), per hosted client
    its optimizer state. Compute: only sampled clients run forward/backward. With ``"local"`` noise, the server's
    average carries √K times the noise of ``"distributed"`` (the price of not trusting the aggregator).

    **Refused or unsupported.** Manual optimization, ``accumulate_grad_batches > 1`` (also when a callback changes
    it during training), several training dataloaders, ``gradient_clip_val``, ``16-mixed``, ``limit_train_batches``,
    normalization layers with running statistics (BatchNorm, InstanceNorm with ``track_running_stats``: local,
    unprivatized state) and any buffer that a client's forward changes (refused before that client's update is
    released), a trainable tensor that is not a peft adapter tensor, a tensor other than the adapters fixed at setup
    becoming trainable (checked at every step, e.g. ``BackboneFinetuning``), a second ``fit`` with the same instance.
    A client update that is not finite (NaN/inf) contributes zero (its upload is noise only) and is counted in the
    non-private :attr:`nonfinite_updates`.

    Args:
        eps: target client-level ε; σ is calibrated for the planned number of rounds at rate ``client_fraction``.
        delta: client-level δ; default ``min(1e-5, 1/K^1.1)``, which stays well below 1/K even for a handful of
            clients.
        noise_multiplier: σ instead of ``eps`` (0 gives a non-private run; ε is then reported as infinite).
        clip: C, the bound on the norm of each client's whole adapter update in one round.
        accountant: ``"prv"`` (default, tight) or ``"rdp"``, both from Opacus.
        seed: seed of the public randomness (the default split of a rank's data among its clients); drawn from OS
            entropy and shared by all ranks if ``None``. Saved in checkpoints.
        sampling_seed: seed of the client sampling and of the clients' local batches. Leave ``None``: a secret seed
            is drawn from OS entropy for every fit and every resume and is never saved. A seed you pass (tests) IS
            saved in checkpoints: never release such a checkpoint.
        rounds: the number of rounds of the whole run (a resumed run included). Without it, the Trainer's
            ``max_epochs`` (one epoch = one round) or ``max_steps // steps_per_round`` sets the plan. With it,
            training stops after ``rounds`` rounds.
        local_steps: local optimizer steps per sampled client per round.
        clients: K, the number of clients (default: the length of ``partition``, else one per rank).
        client_fraction: q, the probability that a client takes part in a round.
        lora: a ``peft.LoraConfig`` to inject, or ``None`` if the module already holds LoRA adapters.
        aggregation: ``"factors"`` or ``"b_only"``, see above.
        noise_placement: ``"local"`` (default) or ``"distributed"``, see above.
        server_lr: η_s, the step the server takes along the averaged update.
        partition: one sequence of training-dataset indices per client (simulation), or ``None``.
        example_eps: optional example-level DP-SGD inside each client: its target ε, calibrated for the worst case
            of a client sampled in every round with the smallest shard.
        example_noise_multiplier: the σ of that DP-SGD instead of ``example_eps``.
        example_clip: per-example clipping norm of that DP-SGD.
        example_delta: its δ; default ``1 / N^1.1`` with N the total number of examples of all clients.
        cluster_environment: Lightning's cluster environment (normally chosen by the Trainer: torchrun, SLURM, ...).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default: Lightning's choice for the device.
        timeout: timeout of the collectives.
        start_method: how processes are started with several devices (``"popen"``, ``"spawn"``, ``"fork"``,
            ``"forkserver"``), see :class:`~lightning_dp.strategies.base.DPStrategyBase`.

    Raises:
        ValueError: an argument out of range (``rounds``, ``local_steps``, ``clients`` < 1, ``client_fraction``
            outside (0, 1], an unknown ``aggregation`` or ``noise_placement``, ``server_lr`` or ``example_clip``
            not a finite positive number, ``example_delta`` without example-level DP, a ``partition`` whose length
            is not ``clients``, or the privacy arguments of :class:`~lightning_dp.strategies.base.DPStrategyBase`).
        UnsafeSettingError: at ``fit``, for the settings refused above; at resume, for a checkpoint whose run
            differs from this one.
    """

    mechanism_name = "dplora_federated"

    def __init__(
        self,
        *,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 1.0,
        accountant: Literal["prv", "rdp"] = "prv",
        seed: int | None = None,
        sampling_seed: int | None = None,
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
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
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
            poisson_sampling=True, seed=seed, sampling_seed=sampling_seed, cluster_environment=cluster_environment,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
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
        self._fedavg: FederatedAveraging | None = None
        self._accounting = FederatedAccounting(self.accountant.kind)
        # private, per-client state: statistics of the clients' data or of the secret client sampling. Never logged,
        # reported or saved (see `ClientUpload`).
        self._clients: ClientSampling | None = None
        self._round_log: list[dict[str, Any]] = []  # per completed round: this rank's `ClientUpload`s
        self._sampler: FederatedBatchSampler | None = None
        self._buffers: BufferSnapshot | None = None
        self._step_offset: int | None = None  # protocol step = Lightning's global step + offset (see `_step`)
        self._restored_clients: dict[str, Any] | None = None
        self._injected_into: weakref.ref | None = None
        self._fitted = False
        self._step_kind = "skip"
        self._losses: Tensor | None = None
        self._dpsgd: BookKeepingDPSGD | None = None
        self._dpsgd_verify = True

    @property
    def nonfinite_updates(self) -> int:
        """NON-PRIVATE diagnostic: how many uploads of this rank's clients had a non-finite update (NaN/inf) and
        contributed zero instead (noise only). It depends on the clients' data: never log, report or save it."""
        return 0 if self._fedavg is None else self._fedavg.nonfinite_updates

    @property
    def _global(self) -> Tensor | None:
        """The global (released) adapters θ, flat fp32."""
        return None if self._fedavg is None else self._fedavg.global_adapters

    @property
    def _shard_sizes(self) -> list[int] | None:
        return None if self._clients is None else self._clients.shard_sizes

    def _step(self, global_step: int) -> int:
        """The protocol's step of a Lightning global step: they differ by the steps of a partial round discarded at
        resume (0 otherwise)."""
        return int(global_step) + (self._step_offset or 0)

    # ------------------------------------------------------------------ setup
    def connect(self, model: Any) -> None:
        """Attach the module and inject ``lora`` into it (once), before any checkpoint is loaded into it."""
        super().connect(model)
        self._inject_adapters(model)

    def _inject_adapters(self, module: nn.Module) -> None:
        if self.lora is None:
            return
        injected = self._injected_into is not None and self._injected_into() is module
        if injected:
            return
        if adapter_parameters(module):
            raise UnsafeSettingError(
                "the module already holds LoRA adapters and `lora=` asks to inject more: pass `lora=None` to "
                "federate the adapters it has"
            )
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.lora, module)
        self._injected_into = weakref.ref(module)

    def setup(self, trainer: Any) -> None:
        """Like :meth:`DPStrategyBase.setup`, without its broadcast of the whole model: the frozen base must never
        travel, so ranks compare its fingerprint instead and only the adapters are broadcast."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            if self._fitted:
                raise UnsafeSettingError(
                    "a DPLoRAFederatedStrategy trains once (its rounds, client sampling and accounting belong to one "
                    "fit): create a new strategy for another fit (or resume it with `ckpt_path=`), and add the "
                    "privacy spends of both runs"
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
        restored = self._restored or {}
        seed = restored.get("seed", self.seed)
        self.seed = int(self.broadcast(secrets.randbits(62) if seed is None else seed))
        self._draw_sampling_seed(restored)  # secret unless the user passed one; dp_state_dict never saves a secret
        if "steps_taken" in restored:
            self.steps_taken = int(restored["steps_taken"])
        self.setup_mechanism(trainer)

    def _prepare_adapters(self, module: nn.Module) -> None:
        """Before the optimizers are built: the module holds peft adapters, and under ``"b_only"`` its A factors
        are frozen."""
        if not adapter_parameters(module):
            raise UnsafeSettingError(
                "DPLoRAFederatedStrategy found no LoRA adapter in the module: pass `lora=peft.LoraConfig(...)` or a "
                "module holding a peft model (`peft.get_peft_model`)"
            )
        if self.aggregation == "b_only":
            for _, p in lora_a_parameters(module):
                p.requires_grad_(False)

    def setup_mechanism(self, trainer: Any) -> None:
        module = self.lightning_module
        assert self._collective is not None and self._noise is not None
        world = self.world_size
        if self.num_clients is None:
            self.num_clients = world
        if self.num_clients % world:
            raise UnsafeSettingError(
                f"clients={self.num_clients} is not a multiple of the {world} ranks: every rank must host the same "
                "number of clients (so all ranks reach each round's all-reduce together)"
            )
        self._check_resumed_settings()
        self.schedule = RoundSchedule(self.num_clients // world, self.local_steps, self.global_rank)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise UnsafeSettingError("the module has no trainable adapter tensor: nothing to federate")
        adapters = adapter_parameters(module)
        adapter_ids = {id(p) for _, p in adapters}
        others = [n for n, p in trainable if id(p) not in adapter_ids]
        if others:
            raise UnsafeSettingError(
                f"{', '.join(others)} require(s) grad but is not a peft adapter tensor: DPLoRAFederatedStrategy "
                "federates the adapters only. Freeze it (`requires_grad_(False)`) or let peft train it "
                "(`LoraConfig(modules_to_save=[...])`)."
            )
        trainable_ids = {id(p) for _, p in trainable}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in trainable_ids:  # pragma: no cover - defensive
                        raise UnsafeSettingError("an optimizer holds a trainable parameter that is not in the module")
        self.adapters = AdapterVector(trainable)
        frozen = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())
                  if id(t) not in adapter_ids]
        self._check_same_base(frozen)
        self._broadcast_from_rank0([p for _, p in adapters])
        self._fedavg = FederatedAveraging(
            self.adapters, self.schedule.clients_per_rank, len(self.optimizers), self.num_clients,
            self.client_fraction, self.clip, self.server_lr, self._noise,
        )
        restored = (self._restored or {}).get("federated", {})
        self.rounds_completed = int(restored.get("rounds_completed", 0))
        if self._restored_clients is not None:
            self._fedavg.client_states.load_state_dict(self._restored_clients["client_states"])
            self._restored_clients = None
        self._step_offset = None
        self._round_log = []
        self._buffers = None
        if self.example_level:
            self._dpsgd = BookKeepingDPSGD(module, self.example_clip)
            self._dpsgd_verify = True
        full = [p for n, p in module.named_parameters() if id(p) not in adapter_ids]
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
        mine = fingerprint(frozen)
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
            shards = split_iid(n, cpr, self.seed)  # the public seed: the same split after a resume
        sizes = torch.zeros(self.num_clients, dtype=torch.float64, device=self.root_device)
        for k, shard in zip(hosted, shards):
            sizes[k] = len(shard)
        self._collective.all_reduce_sum(sizes)  # shard sizes of all clients (K numbers, for the accounting)
        self.dataset_size = int(sizes.sum().item())
        if self._step_offset is None:
            # a checkpoint written mid-round resumes at the start of that round (its partial round is discarded)
            self._step_offset = self.rounds_completed * self.schedule.steps_per_round - trainer.global_step
        self._clients = ClientSampling(self.sampling_seed, self.num_clients, self.client_fraction,
                                       [int(s) for s in sizes.tolist()])
        self._sampler = FederatedBatchSampler(
            shards, self.schedule, self.batch_size, self._clients.participates, self.sampling_seed,
            self.example_level, step_source=lambda: self._step(trainer.global_step),
        )
        self._configure_federated_privacy(trainer)
        return poisson_dataloader(dataloader, self._sampler)

    def _configure_federated_privacy(self, trainer: Any) -> None:
        assert self.schedule is not None and self.num_clients is not None and self._shard_sizes is not None
        restored = self._restored or {}
        spr = self.schedule.steps_per_round
        planned = self._planned_steps(trainer, spr)
        trainer_rounds = None if planned is None else self._step(planned) // spr
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
            self.delta = restored.get("delta", min(1e-5, default_delta(self.num_clients)))
        if self.target_epsilon is not None:
            if restored:  # σ of the run being continued (its plan is what ε was calibrated for)
                self.noise_multiplier = float(restored["noise_multiplier"])
            else:
                self.noise_multiplier = calibrate_noise_multiplier(
                    self.target_epsilon, self.delta, self.sample_rate, self.planned_rounds, self.accountant.kind
                )
        if self.example_level:
            if not any(s > 0 for s in self._shard_sizes):
                raise UnsafeSettingError("every client shard is empty: no data to train on")
            example = restored.get("federated", {})
            if self.example_delta is None:
                self.example_delta = example.get("example_delta") or default_delta(self.dataset_size)
            if self.example_target_epsilon is not None:
                if restored:
                    self.example_noise_multiplier = float(example["example_noise_multiplier"])
                else:
                    self.example_noise_multiplier = self._accounting.calibrate_example_noise(
                        self.example_target_epsilon, self.example_delta, self.batch_size, self._shard_sizes,
                        self.planned_rounds * self.local_steps,
                    )
        if restored and not self.accountant.history:
            self.accountant.load_state_dict(restored["accountant"])
        rank_zero_info(self.privacy_summary())

    def privacy_summary(self) -> str:
        """One line of the run's client-level privacy settings, printed at fit start (clients, fraction, rounds)."""
        if self.target_epsilon is not None:
            target = f"client-level target ε={self.target_epsilon:g}"
        else:
            target = "no target ε (noise_multiplier given; ε reported as spent)"
        sigma = "σ=?" if self.noise_multiplier is None else f"σ={self.noise_multiplier:.4g}"
        line = (f"DPLoRAFederatedStrategy: {target}, δ={self.delta:.3g}, {sigma}, {self.num_clients} clients, "
                f"fraction q={self.client_fraction:.4g} per round, {self.planned_rounds} rounds planned, "
                f"C={self.clip:g}, noise {self.noise_placement}, accountant={self.accountant.kind}")
        if self.example_level and self.example_noise_multiplier is not None:
            line += f"; example-level σ={self.example_noise_multiplier:.4g}, C={self.example_clip:g}"
        return line

    # ------------------------------------------------------------------ the step: one local step of one client
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """One local step of the active client. First, before any forward: the per-step invariants (gradient
        accumulation, one training dataloader), the set of trainable tensors (exactly the federated adapters), the
        number of examples the sampler selected for this step, and (once) a snapshot of every buffer."""
        assert self.schedule is not None and self._clients is not None
        trainer = self.lightning_module.trainer
        self._check_step_invariants(trainer)
        self._check_trainable_set()
        step = self._step(trainer.global_step)
        round_index, slot, _ = self.schedule.position(step)
        batch = args[0] if args else kwargs.get("batch")
        examples = self._examples_of_step(step, batch)
        zero = {"loss": torch.zeros((), device=self.root_device)}
        self._losses = None
        if not self._clients.participates(round_index, self.schedule.client(slot)):
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
        return training_loss(out)

    def _examples_of_step(self, step: int, batch: Any) -> int:
        """The number of examples the federated sampler selected for this step's batch (0: empty or skipped)."""
        count = None if self._sampler is None else self._sampler.pop_count(step)
        if count is None:
            raise UnsafeSettingError(
                f"the batch of step {step} was not drawn by DPLoRAFederatedStrategy's client sampler: its "
                "number of examples, which the per-example contract and the round schedule rely on, is unknown. "
                "Every batch must be one optimizer step (never return None from `training_step`), and the training "
                "DataLoader must be the one passed to `trainer.fit` (not replaced or iterated outside the Trainer)."
            )
        if is_empty_batch(batch) != (count == 0):
            raise RuntimeError(f"internal error: the sampler selected {count} examples for the batch of step "
                               f"{step}, which does not match the batch received")
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
        _, slot, _ = self.schedule.position(self._step(module.trainer.global_step))
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
        round_index, slot, local = self.schedule.position(self._step(trainer.global_step))
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
        assert self._fedavg is not None
        for optimizer, client_state in zip(self.optimizers, self._fedavg.client_states.get(slot)):
            state = optimizer.state_dict()
            state["state"] = client_state
            optimizer.load_state_dict(state)

    def _end_client(self, round_index: int, slot: int) -> None:
        """Refuse any buffer the client's forwards changed, then the client's upload (clipped, noised) into this
        rank's sum, and the adapters back to the global ones for the next client."""
        assert self._fedavg is not None and self.schedule is not None and self._clients is not None
        self._check_buffers()
        client = self.schedule.client(slot)
        self._fedavg.client_states.stage(slot, [optimizer.state_dict()["state"] for optimizer in self.optimizers])
        std = client_noise_std(self.noise_multiplier, self.clip, self.num_clients, self.noise_placement)
        self._fedavg.end_client(std, self._clients.participates(round_index, client), round_index, client,
                                self._clients.shard_sizes[client])

    def _check_buffers(self) -> None:
        """Before a client's update is released: every buffer must be as it was before the first forward (a buffer
        written from the client's data, e.g. by a custom module, would be an un-noised statistic of that data)."""
        if self._buffers is not None:
            self._refuse_changed_buffers(self._buffers, "the forward pass of a client's local steps")

    def _end_round(self, round_index: int, trainer: Any) -> None:
        """One SUM all-reduce of the uploads, the server's averaged step, identical on every rank."""
        assert self._collective is not None and self._fedavg is not None
        nbytes, uploads = self._fedavg.end_round(self._collective)
        self.communication["allreduce_bytes_total"] += nbytes
        self.account_step()
        self.rounds_completed += 1
        # private (see `ClientUpload`): which clients took part is the secret the client sampling amplifies with
        self._round_log.append({"round": round_index, "uploads": uploads, "allreduce_bytes": nbytes})
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
        if self._fedavg is not None:
            self._fedavg.discard_round()

    def on_train_end(self) -> None:
        self._discard_partial_round()
        super().on_train_end()

    def on_validation_start(self) -> None:
        """Validation in the middle of a round sees the released global adapters, never a client's local ones
        (their metrics would be an un-noised function of that client's data)."""
        self._local_during_validation = None
        if self._fedavg is not None and self.adapters is not None:
            self._local_during_validation = self.adapters.read()
            self.adapters.write_(self._fedavg.global_adapters)
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
        return self._accounting.local_epsilon(
            self.noise_multiplier, self.num_clients, self.noise_placement, self.rounds_completed, self.delta
        )

    def example_epsilon(self) -> float:
        """Example-level ε inside each client, from its DP-SGD steps so far. Data-independent worst case, the one
        the calibration assumes: a client that took part in every completed round (``local_steps`` DP-SGD steps
        each) with the smallest non-empty dataset (the highest Poisson rate ``batch_size / N_k``)."""
        if not self.example_level or not self.rounds_completed:
            return 0.0
        assert self._shard_sizes is not None and self.batch_size is not None
        return self._accounting.example_epsilon(
            self.example_noise_multiplier, self.batch_size, self._shard_sizes,
            self.rounds_completed * self.local_steps, self.example_delta,
        )

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
        done = self._step(trainer.global_step + extra_steps) // self.schedule.steps_per_round - self.rounds_completed
        return self.accountant.epsilon(self.delta, (self.noise_multiplier, self.sample_rate, max(0, done)))

    # ------------------------------------------------------------------ checkpoints
    def dp_state_dict(self) -> dict[str, Any]:
        """The base's DP state and the federated run's public state: completed rounds and the settings a resumed
        run must share. Never a per-client statistic or a secret seed."""
        state = super().dp_state_dict()
        state["federated"] = {
            "rounds_completed": self.rounds_completed,
            "clients": self.num_clients,
            "client_fraction": self.client_fraction,
            "local_steps": self.local_steps,
            "aggregation": self.aggregation,
            "noise_placement": self.noise_placement,
            "world_size": self.world_size,
            "example_level": self.example_level,
            "example_clip": self.example_clip if self.example_level else None,
            "example_noise_multiplier": self.example_noise_multiplier,
            "example_delta": self.example_delta,
        }
        return state

    def _clients_path(self, filepath: Any) -> str:
        """Where this rank keeps its hosted clients' states next to the checkpoint ``filepath``."""
        return f"{filepath}.clients-{self.global_rank}-of-{self.world_size}"

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Only released state goes into the checkpoint: the global adapters (mid-round, the module holds a client's
        local, un-noised adapters) and no optimizer state (the optimizer holds the active client's state, e.g. a
        momentum that sums its raw gradients). Every rank writes its clients' states (as of the last completed
        round) to its own file beside it (:meth:`_clients_path`)."""
        if self.adapters is not None and self._fedavg is not None:
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                for name, value in self.adapters.named_chunks(self._fedavg.global_adapters):
                    if name not in state:
                        raise UnsafeSettingError(
                            f"the adapter tensor {name} is not in the checkpoint's state_dict, so its local (client) "
                            "value could not be replaced by the released global one; save the checkpoint from the "
                            "Trainer (`trainer.save_checkpoint`, ModelCheckpoint)"
                        )
                    state[name] = value.to(state[name].device)
            for opt_state in checkpoint.get("optimizer_states", []) or []:
                if isinstance(opt_state, dict):
                    opt_state["state"] = {}
            if "optimizer_states" in checkpoint:  # a full checkpoint (not weights_only): it can be resumed
                clients = {"version": _CLIENTS_FILE_VERSION, "rounds_completed": self.rounds_completed,
                           "client_states": self._fedavg.client_states.state_dict()}
                self.checkpoint_io.save_checkpoint(clients, self._clients_path(filepath))
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # DP state: dp_state_dict

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the checkpoint (rank 0) and this rank's file of client states beside it."""
        super().remove_checkpoint(filepath)
        self.checkpoint_io.remove_checkpoint(self._clients_path(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Fitting: the DP state and this rank's file of client states, to resume the run. Evaluating
        (``validate``/``test``/``predict``): only the weights (the global adapters) are used.

        Raises:
            UnsafeSettingError: a checkpoint that cannot continue this run (not written by this strategy's fit, a
                ``weights_only`` checkpoint, its client states missing or from another save).
        """
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        state = self._restored
        if state is None or "federated" not in state:
            raise UnsafeSettingError(
                "this checkpoint holds no federated DP state (it was not written by a DPLoRAFederatedStrategy fit): "
                "its rounds, clients and privacy spend cannot be continued. Start a new run; to evaluate it, use "
                "`trainer.validate`/`trainer.test`."
            )
        path = self._clients_path(checkpoint_path)
        try:
            clients = self.checkpoint_io.load_checkpoint(path, weights_only=True)
        except FileNotFoundError:
            raise UnsafeSettingError(
                f"resuming needs the clients' states that rank {self.global_rank} saved beside the checkpoint "
                f"({path}): missing (a `weights_only` checkpoint, another number of ranks, or the file was not "
                "copied with the checkpoint)"
            ) from None
        if int(clients.get("rounds_completed", -1)) != int(state["federated"]["rounds_completed"]):
            raise UnsafeSettingError(f"{path} was written by another save than {checkpoint_path}: resume from a "
                                     "checkpoint and the client-state files saved with it")
        self._restored_clients = clients
        return checkpoint

    def _check_resumed_settings(self) -> None:
        """A resumed run continues the checkpoint's protocol and privacy spend: the same round schedule, clients,
        sampling rate, placement, aggregation and example-level mechanism."""
        if not self._restored:
            return
        saved = self._restored["federated"]
        mine = {"clients": self.num_clients, "client_fraction": self.client_fraction, "local_steps": self.local_steps,
                "aggregation": self.aggregation, "noise_placement": self.noise_placement,
                "world_size": self.world_size, "example_level": self.example_level,
                "example_clip": self.example_clip if self.example_level else None}
        differ = [f"{key}={saved.get(key)!r} (this run: {mine[key]!r})" for key in _RESUME_SETTINGS
                  if saved.get(key) != mine[key]]
        if differ:
            raise UnsafeSettingError(
                f"the checkpoint's federated run used {', '.join(differ)}: resume with the same settings (its "
                "rounds, clients and privacy spend continue), or start a new run"
            )
