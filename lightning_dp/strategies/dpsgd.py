"""``Trainer(strategy=DPSGDStrategy(eps=3))``: DP-SGD with per-example clipping from one backward pass."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_dp.mechanisms.chunks import split_batch, with_batch
from lightning_dp.mechanisms.dpsgd import CLIPPING_MODES, BookKeepingDPSGD, DPSGDStepResult, UnsupportedLayerError
from lightning_dp.mechanisms.per_sample import per_sample_loss
from lightning_dp.preflight import optimizer_problems, raise_if_problems
from lightning_dp.strategies.base import DPStrategyBase, UnsafeSettingError

__all__ = ["DPSGDStrategy", "UnsupportedLayerError"]


class DPSGDStrategy(DPStrategyBase):
    """DP-SGD (Abadi et al. 2016) with flat per-example clipping computed by book-keeping (Bu et al. 2023) and
    ghost norms (Li et al. 2022): one forward, ONE backward of ``Σ_i ℓ_i``, no per-example gradient for linear and
    embedding layers, no second backward (``clipping="bk"``, the default); or ghost clipping with a second backward
    and the memory of non-private training (``clipping="ghost"``).

    Use it with any LightningModule whose ``training_step`` returns per-example losses (a Tensor ``[B]`` or a dict
    with ``"per_sample_loss"``), with your own optimizer (SGD, Adam, AdamW, ...) and LR schedulers: they step on the
    private gradient ``(Σ_i c_i ∇_i + N(0, σ²C²I)) / (q·N)``, ``c_i = min(1, C / (||∇_i|| + 1e-6))`` over all
    trainable parameters jointly. Every parameter with ``requires_grad`` is privatized; frozen ones cost nothing.

    Supported trainable layers: ``nn.Linear``, ``nn.Embedding`` (``padding_idx`` rows get no gradient),
    ``nn.LayerNorm``, transformers ``Conv1D``, HF ``*RMSNorm`` (Llama, T5, ...), and any module type with an Opacus
    grad sampler. ``BatchNorm`` and other module types are refused with an error naming the module. Tied parameters
    (e.g. GPT-2 ``wte``/``lm_head``) are handled exactly by instantiating their per-example gradients (memory
    ``B × numel`` for each use of such a parameter).

    Hooks: the private gradient replaces ``.grad`` inside ``backward``, before ``on_after_backward``; callbacks,
    ``on_before_optimizer_step`` and the optimizer never see a non-private gradient. Noise is added once across
    ranks (rank 0, OS-entropy seed per step) before one SUM all-reduce of a flat fp32 buffer; no DDP reducer.
    An empty Poisson batch skips forward/backward: its gradient is noise / (q·N), still one step on every rank.

    On the first step of a fit, ``Σ_i ∇_i`` rebuilt from the hooks is checked against autograd's gradient of
    ``Σ_i ℓ_i``: a trainable parameter used outside the module that owns it (e.g. ``F.linear(x, emb.weight)``)
    raises an error instead of being clipped wrongly. Modules must take batch-first inputs (dim 0 = example).
    From the second step on, the backward pass stops at the hooked modules' outputs: autograd's own parameter
    gradients (one GEMM per linear layer, which book-keeping recomputes clipped) are never computed, and
    ``LightningModule.backward`` is not called (``on_before_backward`` / ``on_after_backward`` still are).

    Args:
        eps: target ε for the whole run (σ is calibrated for the steps the Trainer will take).
        delta: δ; default ``1 / N**1.1`` (N = training set size).
        noise_multiplier: σ, instead of ``eps``; ε is then reported as it is spent.
        clip: C, the bound on each example's gradient norm (over all trainable parameters jointly).
        accountant: ``"prv"`` (default) or ``"rdp"`` (Opacus's accountants).
        poisson_sampling: Poisson sampling of every step's batch (default), or ``False`` to keep your DataLoader's
            batches, accounted without amplification (see :class:`~lightning_dp.strategies.base.DPStrategyBase`).
        max_physical_batch_size: the most examples per forward/backward pass: larger logical batches run in chunks
            whose clipped sums are added; noise, accounting and the optimizer step once per logical batch.
        seed: public seed (saved in checkpoints); drawn if ``None``.
        sampling_seed: seed of the Poisson masks; leave ``None`` (a secret seed, never saved).
        clipping: ``"bk"`` (book-keeping: one backward; the inputs and output gradients of the linear and
            embedding layers are held until the clipped sum is formed, each pair freed as soon as its layer's sum is
            written; norm layers' small per-example gradients are formed during backward; measured within 1.10x of
            non-private peak memory on BERT-width encoders; the fastest), ``"ghost"`` (the first backward streams
            the norms and frees each output gradient at once, a second backward of ``Σ_i c_i ℓ_i`` gives the clipped
            sum: the memory of non-private training, one more backward of time) or ``"auto"`` (``"bk"``, the
            measured choice: as little memory at far less time). Both give the same private gradient.
        cluster_environment: Lightning's cluster environment (normally chosen by the Trainer).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default: Lightning's choice.
        timeout: timeout of the collectives.
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Raises:
        ValueError: an argument out of range.
        UnsafeSettingError: at setup, a Trainer setting or module that would break the guarantee (accumulation,
            gradient clipping, fp16 GradScaler, manual optimization, running statistics, ...).
        ValidationError: at setup, before any step: every problem of the module and its optimizers at once
            (unsupported trainable layers, BatchNorm, running statistics, reentrant checkpointing, parameters used
            outside their module, LBFGS, ...; see :func:`lightning_dp.validate`).
    """

    mechanism_name = "dpsgd"

    def __init__(
        self,
        *,
        eps: float | None = None,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        clip: float = 1.0,
        accountant: Literal["prv", "rdp"] = "prv",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        sampling_seed: int | None = None,
        clipping: Literal["auto", "bk", "ghost"] = "auto",
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if clipping not in ("auto", *CLIPPING_MODES):
            raise ValueError(f"`clipping` must be 'auto', 'bk' or 'ghost', got {clipping!r}")
        super().__init__(
            eps=eps,
            delta=delta,
            noise_multiplier=noise_multiplier,
            clip=clip,
            accountant=accountant,
            poisson_sampling=poisson_sampling,
            max_physical_batch_size=max_physical_batch_size,
            seed=seed,
            sampling_seed=sampling_seed,
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.clipping = clipping

    @property
    def clipping_mode(self) -> str:
        """The clipping algorithm in use: ``"bk"`` for ``clipping="auto"``."""
        return "bk" if self.clipping == "auto" else self.clipping

    # per-fit state:
    mechanism: BookKeepingDPSGD | None = None
    last_step: DPSGDStepResult | None = None
    """What the last step computed on this rank: realized batch size, clipped fraction, per-example norms, count of
    non-finite examples. NOT private (statistics of the sampled records before noise): for debugging only, never log
    or release it."""
    nonfinite_examples = 0
    """Examples (this rank, this fit) whose gradient norm was not finite (NaN/inf loss or input) and that were given
    clip factor 0, so they contributed nothing. NOT private: a diagnostic for you, never to be logged or released."""
    _losses: Tensor | None = None
    _empty = False
    _verify_next = True
    _reference: dict | None = None
    _privatized: frozenset = frozenset()
    _partial: Tensor | None = None  # the clipped sums of the step's earlier chunks (flat fp32), until the release
    _chunk_results: tuple = ()  # the DPSGDStepResult of each of the step's earlier chunks

    @property
    def gradient_noise_std(self) -> float:
        """Per-entry std of the Gaussian noise in the private gradient the optimizer sees: ``σ·C / (q·N)``.

        Known exactly (it is what :meth:`_release` adds), so post-processing such as RMT denoising can use it.
        Raises before the privacy parameters are set up (before ``fit`` starts).
        """
        if self.noise_multiplier is None or self.expected_batch_size is None:
            raise RuntimeError("the noise std is known once fit() has set up the privacy parameters")
        return float(self.noise_multiplier) * float(self.clip) / float(self.expected_batch_size)

    # ------------------------------------------------------------------ setup
    def setup_mechanism(self, trainer: Any) -> None:
        self.nonfinite_examples = 0
        self._build_mechanism()

    def _build_mechanism(self) -> None:
        """Hooks and flat buffer over exactly the parameters that require grad now; verified on the next step."""
        if self.mechanism is not None:
            self.mechanism.remove_hooks()
            self.mechanism = None
        # the optimizers' problems (parameters outside the module, LBFGS), all in one error (lightning_dp.validate)
        raise_if_problems(optimizer_problems(self.lightning_module, self.optimizers, self), type(self).__name__)
        self.mechanism = BookKeepingDPSGD(self.lightning_module, self.clip, mode=self.clipping_mode)
        self._privatized = frozenset(id(p) for p in self.mechanism.params)
        self._verify_next = True

    def _optimizer_params(self) -> list[torch.nn.Parameter]:
        return [p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]]

    def _sync_trainable(self) -> None:
        """Every parameter that requires grad now (in the module or an optimizer) is privatized on this step: when
        the set changed since the mechanism was built (e.g. ``BackboneFinetuning`` unfroze the backbone and added it
        to the optimizer), the mechanism is rebuilt over the new set (and verified again)."""
        trainable = {id(p) for p in self.lightning_module.parameters() if p.requires_grad}
        trainable |= {id(p) for p in self._optimizer_params() if p.requires_grad}
        if trainable != self._privatized:
            rank_zero_info(
                f"DPSGDStrategy: the trainable parameters changed ({len(self._privatized)} -> {len(trainable)} "
                "tensors): rebuilding the per-example clipping over the new set"
            )
            self._build_mechanism()

    def _drop_other_grads(self) -> None:
        """No gradient other than the private one reaches the optimizer: ``.grad`` of every parameter that is not
        privatized (frozen, or reached only outside its module) is cleared."""
        for p in list(self.lightning_module.parameters()) + self._optimizer_params():
            if p.grad is not None and id(p) not in self._privatized:
                p.grad = None

    def teardown(self) -> None:
        if self.mechanism is not None:
            self.mechanism.remove_hooks()
            self.mechanism = None
        super().teardown()

    def privacy_report(self) -> dict[str, Any]:
        return {**super().privacy_report(), "clipping": self.clipping_mode}

    # ------------------------------------------------------------------ the step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The forward pass of the step's batch. With ``max_physical_batch_size=M`` the batch runs in chunks of at
        most M examples: every chunk but the last gets its forward, its backward and its clipped sum here (so its
        activations and output gradients are freed before the next chunk's forward); the last chunk's backward, the
        noise and the release happen in :meth:`backward`, once per batch. The returned ``"loss"`` is the mean over
        all examples of the batch; other entries of a returned dict are those of the last chunk.

        Raises:
            PerSampleLossError: ``training_step`` did not return one loss per example of its (chunk of the) batch,
                or the batch cannot be split into chunks (a tensor that is not batch-first).
        """
        assert self.mechanism is not None
        batch = args[0] if args else kwargs.get("batch")
        self._losses = None
        self._partial, self._chunk_results = None, ()
        size = self._begin_step(self.lightning_module.trainer, batch)
        self._sync_trainable()
        self._empty = size == 0
        if self._empty:
            return {"loss": torch.zeros((), device=self.root_device)}
        chunks = split_batch(batch, size, self.max_physical_batch_size)
        logged = []
        for k, (chunk, n) in enumerate(chunks):
            out = self._forward(*with_batch(args, kwargs, chunk), n)
            losses = per_sample_loss(out, n)
            logged.append(losses.detach().float())
            if k + 1 < len(chunks):
                self._accumulate_chunk(losses)
                del out, losses
        self._end_forward()
        self._losses = losses
        result = dict(out) if isinstance(out, Mapping) else {}
        result.pop("per_sample_loss", None)
        result["loss"] = torch.cat(logged).mean()
        return result

    def _forward(self, args: tuple, kwargs: dict, size: int) -> Any:
        """The user's ``training_step`` on ``size`` examples, with the hooks capturing their inputs."""
        assert self.mechanism is not None
        self.mechanism.reset()
        self.mechanism.batch_size = size
        self.mechanism.capturing = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self.mechanism.capturing = False

    def _accumulate_chunk(self, losses: Tensor) -> None:
        """The backward of a chunk that is not the step's last, and its clipped sum added into the step's buffer."""
        assert self.mechanism is not None
        self.mechanism.clear_grads()  # the checked backward of the first step accumulates into `.grad`
        reference = self.mechanism.backward(losses, verify=self._verify_next)
        if self.mechanism.mode == "bk":
            self.mechanism.clear_grads()  # autograd's non-private sum of the checked step (kept in `reference`)
        self._partial, result = self.mechanism.accumulate(
            int(losses.shape[0]), self.root_device, reference_grads=reference, out=self._partial
        )
        self._chunk_results = (*self._chunk_results, result)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """One backward of ``Σ_i ℓ_i`` (of the last chunk), then the private gradient replaces ``.grad`` before
        ``on_after_backward``; ``on_before_backward`` / ``on_after_backward`` run once per batch.

        Raises:
            UnsafeSettingError: called without a preceding ``training_step`` of this strategy.
        """
        assert self.mechanism is not None
        module = self.lightning_module
        self.pre_backward(closure_loss)
        self.mechanism.clear_grads()
        batch = 0
        if not self._empty:
            if self._losses is None:
                raise UnsafeSettingError(
                    "DPSGDStrategy.backward was called without a preceding training_step of this strategy "
                    "(manual `backward` calls are not supported)"
                )
            batch = int(self._losses.shape[0])
            self.precision_plugin.pre_backward(self._losses.sum(), module)  # on_before_backward hooks
            # the first step runs an ordinary backward whose gradient checks the hooks; later ones stop at the hooked
            # outputs (no autograd weight-gradient GEMMs); ghost mode adds the backward of Σ_i c_i ℓ_i
            self._reference = self.mechanism.backward(self._losses, verify=self._verify_next)
        self._losses = None
        self._release(batch)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _release(self, batch: int) -> None:
        """The last chunk's clipped sum added to the earlier chunks', the noise (once), the all-reduce, ``.grad``,
        one accounted step."""
        assert self.mechanism is not None and self._collective is not None
        assert self.noise_multiplier is not None and self.expected_batch_size is not None
        reference, self._reference = self._reference, None
        partial, self._partial = self._partial, None
        earlier, self._chunk_results = self._chunk_results, ()
        if self.mechanism.mode == "bk":
            self.mechanism.clear_grads()  # drop the non-private sum autograd accumulated on the checked step
        flat, result = self.mechanism.private_sum(
            batch, self.noise_multiplier * self.clip, self._collective, self.root_device, reference_grads=reference,
            out=partial,
        )
        del reference, partial
        result = DPSGDStepResult.merge([*earlier, result])
        if result.num_examples > 0 and result.verified:
            self._verify_next = False  # checked on finite values: later steps stop at the hooked outputs
        self.nonfinite_examples += result.nonfinite
        self.mechanism.write_grads(flat, 1.0 / self.expected_batch_size)
        self._drop_other_grads()
        self.account_step()
        self.last_step = result

    def on_exception(self, exception: BaseException) -> None:
        if self.mechanism is not None:
            self.mechanism.capturing = False
            self.mechanism.reset()
            self.mechanism.clear_grads()
        self._partial, self._chunk_results = None, ()
        super().on_exception(exception)
