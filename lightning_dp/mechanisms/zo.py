"""DPZero: private zeroth-order optimization (Zhang et al., arXiv 2310.09639), on plain tensors.

One step at parameters θ with direction z (public, regenerated from a seed, never stored)::

    s_i   = (ℓ_i(θ + λz) − ℓ_i(θ − λz)) / (2λ)          per-example finite difference (a scalar)
    ĝ     = (Σ_i clip_C(s_i) + σ·C·ξ) / E[B]             ξ ~ N(0, 1), added once across all ranks
    θ    <- (1 − η·wd)·θ − η·ĝ·z

``clip_C(s) = s·min(1, C/|s|)`` bounds each example's contribution to the released scalar by C, so the release is
the sampled Gaussian mechanism with noise multiplier σ. The only privatized quantity is one scalar per step; the
direction z is data-independent and public.

This module has no Lightning import: :class:`SeededDirections` owns the in-place perturbation of a fixed list of
parameters, :func:`privatize_projected_gradients` owns the clipped, noised, all-reduced scalars of a step's directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from custom_kernels.zo_perturb import DISTRIBUTIONS, Distribution, mix_seed, normal_stream, offsets_for, perturb_
from lightning_dp.mechanisms.collective import Collective
from lightning_dp.mechanisms.noise import GaussianNoise

__all__ = [
    "PRUNING_SCORES",
    "SeededDirections",
    "StagewiseSchedule",
    "ZOStepResult",
    "clip_differences",
    "constant_input_objective",
    "data_free_mask",
    "privatize_projected_gradient",
    "privatize_projected_gradients",
]

_DIRECTION_DOMAIN = 0x2E80


class SeededDirections:
    """The ZO direction z over a fixed, ordered list of parameters, applied in place.

    ``distribution`` is that of z's coordinates: ``"gaussian"`` (standard normal, as in MeZO and DPZero's code) or
    ``"rademacher"`` (independent uniform signs ±1; see :class:`~lightning_dp.strategies.DPZeroStrategy`).

    z for step t (and direction j of that step) is a function of ``(base_seed, t, j)`` only (counter-based:
    identical on every rank and after a resume). The object remembers the perturbation currently applied to the
    parameters (``pending``: seed -> scale), so it can always be removed (:meth:`restore`) and the update can fuse
    the removal with the step.

    Sparse training (:meth:`set_mask`): each parameter gets a compact list of the flat indices of its trainable
    coordinates (int32; int64 only for tensors of more than 2**31 - 1 elements). z is then generated for those
    coordinates only, every pass reads and writes only them, and every other coordinate stays bit-identical. The
    mask costs 4 bytes per trainable coordinate (at 1 % of an fp32 model: 1 % of its size; a bit mask would cost
    3.1 %), never a dense float copy.

    Proximal anchor (:meth:`set_anchor`): a copy of the trainable coordinates (all of them, or only the masked ones)
    for the proximal pull ``γ(θ − θ_anchor)`` of :meth:`update`; it costs one more copy of the *trainable*
    coordinates (the full model under full fine-tuning, 1 % of it under a 1 % mask) and one more read-modify-write
    pass over them per step.
    """

    def __init__(self, params: Sequence[Tensor], base_seed: int, distribution: Distribution = "gaussian") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.params = list(params)
        if not self.params:
            raise ValueError("no trainable parameters to optimize")
        self.distribution: Distribution = distribution
        self.indices: list[Tensor] | None = None
        self.offsets = offsets_for(self.params)
        self.anchor: list[Tensor] | None = None
        self.base_seed = int(base_seed)
        self.pending: dict[int, float] = {}
        self.passes = 0  # read+write passes over the parameters so far (diagnostics)

    # ------------------------------------------------------------------ mask and anchor
    @property
    def num_coordinates(self) -> int:
        """Number of coordinates that are perturbed and updated."""
        if self.indices is None:
            return sum(p.numel() for p in self.params)
        return sum(int(i.numel()) for i in self.indices)

    def set_mask(self, indices: Sequence[Tensor] | None) -> None:
        """Train only the coordinates ``indices[k]`` (flat indices) of each parameter ``k``; ``None``: all of them.

        The parameters must be clean (nothing pending). Each list is checked (1-D, integer, in range, distinct),
        sorted and stored as int32 on the parameter's device. The proximal anchor is dropped (it is per coordinate).
        """
        if self.pending:
            raise RuntimeError("set_mask needs the clean parameters: restore() the pending perturbation first")
        if indices is None:
            self.indices = None
        else:
            indices = list(indices)
            if len(indices) != len(self.params):
                raise ValueError(f"got {len(indices)} index lists for {len(self.params)} parameters")
            checked = []
            for k, (p, idx) in enumerate(zip(self.params, indices)):
                idx = torch.as_tensor(idx).reshape(-1)
                if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
                    raise ValueError(f"mask of parameter {k}: flat indices must be integers, got {idx.dtype}")
                idx = torch.sort(idx.to(device=p.device, dtype=torch.int64)).values
                if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= p.numel()):
                    raise ValueError(f"mask of parameter {k}: indices must lie in [0, {p.numel()})")
                if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                    raise ValueError(f"mask of parameter {k}: indices must be distinct")
                checked.append(idx.to(torch.int32) if p.numel() <= 2**31 - 1 else idx)
            if not any(i.numel() for i in checked):
                raise ValueError("the mask selects no coordinate: nothing to train")
            self.indices = checked
        self.offsets = offsets_for(self.params, self.indices)
        self.anchor = None

    def set_anchor(self) -> None:
        """θ_anchor <- the current (clean) trainable coordinates, for the proximal term of :meth:`update`."""
        if self.pending:
            raise RuntimeError("set_anchor needs the clean parameters: restore() the pending perturbation first")
        if self.indices is None:
            self.anchor = [p.detach().clone() for p in self.params]
        else:
            self.anchor = [p.detach().view(-1).index_select(0, i) for p, i in zip(self.params, self.indices)]

    def state_dict(self) -> dict:
        """The mask and the anchor (tensors moved to the CPU), for checkpoints."""
        return {
            "indices": None if self.indices is None else [i.cpu() for i in self.indices],
            "anchor": None if self.anchor is None else [a.cpu() for a in self.anchor],
        }

    def load_state_dict(self, state: dict) -> None:
        self.set_mask(state.get("indices"))
        anchor = state.get("anchor")
        if anchor is not None:
            if len(anchor) != len(self.params):
                raise ValueError(f"the anchor has {len(anchor)} tensors for {len(self.params)} parameters")
            expected = [p.shape if self.indices is None else i.shape
                        for p, i in zip(self.params, self.indices or self.params)]
            for k, (a, shape) in enumerate(zip(anchor, expected)):
                if tuple(a.shape) != tuple(shape):
                    raise ValueError(f"anchor tensor {k} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            self.anchor = [a.to(device=p.device, dtype=p.dtype) for a, p in zip(anchor, self.params)]

    # ------------------------------------------------------------------ passes
    def seed_for(self, step: int, direction: int = 0) -> int:
        """Seed of direction ``direction`` of step ``step`` (direction 0 is the single direction of plain DPZero)."""
        if direction == 0:
            return mix_seed(_DIRECTION_DOMAIN, self.base_seed, step)
        return mix_seed(_DIRECTION_DOMAIN, self.base_seed, step, direction)

    def _perturb_(self, seed: int, scale, **kwargs) -> None:
        perturb_(self.params, self.offsets, seed, scale, indices=self.indices, distribution=self.distribution, **kwargs)
        self.passes += 1

    def perturb(self, seed: int, scale: float) -> None:
        """θ <- θ + scale·z(seed)."""
        self._perturb_(seed, scale)
        self._track(seed, scale)

    def _track(self, seed: int, scale: float) -> None:
        total = self.pending.get(seed, 0.0) + scale
        if total == 0.0:
            self.pending.pop(seed, None)
        else:
            self.pending[seed] = total

    def move_to(self, seed: int, scale: float) -> None:
        """Bring the applied perturbation to exactly ``scale·z(seed)`` (removing any other pending one). Removing
        one other direction and applying this one are fused into one pass."""
        others = [s for s in self.pending if s != seed]
        delta = scale - self.pending.get(seed, 0.0)
        if len(others) == 1 and delta != 0.0:
            (other,) = others
            undo = -self.pending[other]
            self._perturb_(other, undo, seed2=seed, scale2=delta)
            self._track(other, undo)
            self._track(seed, delta)
            return
        for other in others:
            self.perturb(other, -self.pending[other])
        if delta != 0.0:
            self.perturb(seed, delta)

    def restore(self) -> None:
        """Remove every pending perturbation: the parameters are the clean θ again."""
        for seed in list(self.pending):
            self.perturb(seed, -self.pending[seed])

    def update(
        self,
        seed: int | Sequence[int],
        projected_grad: float | Sequence[float],
        lrs: Sequence[float],
        weight_decays: Sequence[float] | None = None,
        next_seed: int | None = None,
        next_scale: float = 0.0,
        prox: float = 0.0,
    ) -> None:
        """The update of one step with q = ``len(seed)`` directions, applied per tensor k::

            θ <- θ − η_k·( (1/q)·Σ_j ĝ_j·z(seed_j) + wd_k·θ + prox·(θ − θ_anchor) )

        in place of the pending ``p·z(seed_j)`` (removed in the same pass), optionally adding
        ``next_scale·z(next_seed)`` for the next step's first probe. One fused pass for q = 1 (two directions per
        pass: ⌈(q + 1)/2⌉ passes in general), plus one pass over the trainable coordinates when ``prox > 0``.
        """
        seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
        if isinstance(projected_grad, (int, float)):
            grads = [float(projected_grad)]
        else:
            grads = [float(g) for g in projected_grad]
        if len(seeds) != len(grads) or not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(
                f"need one projected gradient per distinct seed, got {len(seeds)} seeds, {len(grads)} values"
            )
        if prox < 0:
            raise ValueError(f"`prox` must be >= 0, got {prox}")
        if prox > 0 and self.anchor is None:
            raise RuntimeError("a proximal update needs an anchor: call set_anchor() at the start of the stage")
        for other in [s for s in self.pending if s not in seeds]:
            self.perturb(other, -self.pending[other])
        q = len(seeds)
        wds = weight_decays if weight_decays is not None else [0.0] * len(self.params)
        decays = [1.0 - lr * (wd + prox) for lr, wd in zip(lrs, wds)]
        if any(d <= 0 for d in decays):
            raise ValueError(f"lr·(weight_decay + prox) must be < 1 for every parameter (decays {decays})")
        if prox > 0:
            # θ += (ηγ/d)·θ_anchor first, so that the decay of the fused pass below makes it exactly ηγ·θ_anchor; the
            # order of the operations does not depend on whether the next step's +λz is fused (resume-exact)
            for k, (p, a) in enumerate(zip(self.params, self.anchor)):
                alpha = lrs[k] * prox / decays[k]
                if self.indices is None:
                    p.add_(a, alpha=alpha)
                elif a.numel():
                    p.view(-1).index_add_(0, self.indices[k], a, alpha=alpha)
            self.passes += 1
        terms = []
        for s, g in zip(seeds, grads):
            p = self.pending.pop(s, 0.0)
            terms.append((s, [-d * p - lr * g / q for d, lr in zip(decays, lrs)]))
        if next_seed is not None and next_scale != 0.0:
            terms.append((int(next_seed), float(next_scale)))
        use_decay = any(d != 1.0 for d in decays)
        for i in range(0, len(terms), 2):
            (s1, c1), second = terms[i], terms[i + 1 : i + 2]
            kwargs = {"seed2": second[0][0], "scale2": second[0][1]} if second else {}
            self._perturb_(s1, c1, decay=decays if (use_decay and i == 0) else None, **kwargs)
        self.pending = {int(next_seed): float(next_scale)} if next_seed is not None and next_scale != 0.0 else {}


def clip_differences(loss_plus: Tensor, loss_minus: Tensor, zo_eps: float, clip: float) -> Tensor:
    """Per-example finite differences ``(ℓ⁺ − ℓ⁻)/(2λ)``, clipped to ``[−C, C]`` (computed in float64)."""
    if loss_plus.shape != loss_minus.shape or loss_plus.ndim != 1:
        raise ValueError(
            f"per-example losses must both have shape [B], got {tuple(loss_plus.shape)} and {tuple(loss_minus.shape)}"
        )
    diffs = (loss_plus.detach().double() - loss_minus.detach().double()) / (2.0 * zo_eps)
    diffs = torch.nan_to_num(diffs, nan=0.0, posinf=clip, neginf=-clip)
    return diffs.clamp(-clip, clip)


@dataclass(frozen=True)
class ZOStepResult:
    """What one private ZO step released (``projected_grad``) and, for diagnostics and tests, its parts."""

    projected_grad: float
    clipped_sum: float
    noise: float
    num_examples: int


def privatize_projected_gradient(
    clipped: Tensor | None,
    noise_std: float,
    expected_batch_size: float,
    collective: Collective,
    noise: GaussianNoise | None,
    device: torch.device | str = "cpu",
) -> ZOStepResult:
    """One direction's release: :func:`privatize_projected_gradients` with a single direction."""
    return privatize_projected_gradients([clipped], noise_std, expected_batch_size, collective, noise, device)[0]


def privatize_projected_gradients(
    clipped: Sequence[Tensor | None],
    noise_std: float,
    expected_batch_size: float,
    collective: Collective,
    noise: GaussianNoise | None,
    device: torch.device | str = "cpu",
) -> list[ZOStepResult]:
    """The releases of all directions of one step: per direction j, sum the clipped differences of all ranks, add
    its own ``N(0, noise_std²)`` exactly once (k independent draws on rank 0, before the all-reduce, so every rank
    receives the same noisy sums), and divide by the expected batch size.

    ``clipped[j]`` is this rank's ``[b]`` tensor of clipped differences for direction j (``None`` for an empty
    batch). One all-reduce of ``3·k`` float64 scalars per step, whatever the number of directions k, and one
    device-to-host copy.
    """
    if expected_batch_size <= 0:
        raise ValueError(f"expected batch size must be > 0, got {expected_batch_size}")
    k = len(clipped)
    if k == 0:
        raise ValueError("no direction to release")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.stack([c.sum().to(device=device, dtype=torch.float64) if c is not None else zero for c in clipped])
    counts = torch.tensor([float(c.numel()) if c is not None else 0.0 for c in clipped], dtype=torch.float64,
                          device=device)
    draws = torch.zeros(k, dtype=torch.float64, device=device)
    if collective.rank == 0 and noise_std > 0:
        if noise is None:
            raise ValueError("noise_std > 0 but no noise source was given")
        draws = noise.sample((k,), noise_std, dtype=torch.float64).to(device)
    packed = collective.all_reduce_sum(torch.cat([sums, counts, draws])).tolist()
    return [
        ZOStepResult(
            projected_grad=(packed[j] + packed[2 * k + j]) / expected_batch_size,
            clipped_sum=packed[j],
            noise=packed[2 * k + j],
            num_examples=int(round(packed[k + j])),
        )
        for j in range(k)
    ]


# ---------------------------------------------------------------------------------------------- stagewise schedule
@dataclass(frozen=True)
class StagewiseSchedule:
    """The stage structure of DP-ZOSO (Liu et al., arXiv 2402.07818): stage ``s`` lasts ``first_stage_steps·2^s``
    steps (the last stage runs to the end of training), the learning rate is multiplied by ``lr_decay`` at the
    start of every stage after the first, and λ decays geometrically from ``zo_eps_start`` (stage 0) to
    ``zo_eps_end`` (last stage)::

        start(s) = T0·(2^s − 1)        lr(s) = lr(0)·lr_decay^s
        λ(s)     = exp(log λ_start + s/(S − 1)·(log λ_end − log λ_start))      (λ_start when S = 1)

    λ is computed in log space from two validated positive finite endpoints, so it is always finite and > 0
    (``λ_end > λ_start``, ``=``, ``<`` all work), and the endpoints are returned exactly.
    """

    stages: int
    first_stage_steps: int
    lr_decay: float = 0.5
    zo_eps_start: float = 1e-3
    zo_eps_end: float = 1e-3

    def __post_init__(self) -> None:
        if not (isinstance(self.stages, int) and self.stages >= 1):
            raise ValueError(f"`stages` must be an integer >= 1, got {self.stages!r}")
        if not (isinstance(self.first_stage_steps, int) and self.first_stage_steps >= 1):
            raise ValueError(f"`first_stage_steps` must be an integer >= 1, got {self.first_stage_steps!r}")
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ValueError(f"`lr_decay` must be in (0, 1], got {self.lr_decay!r}")
        for name in ("zo_eps_start", "zo_eps_end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")

    def stage_start(self, stage: int) -> int:
        """First step of ``stage``."""
        return self.first_stage_steps * ((1 << stage) - 1)

    def stage_of(self, step: int) -> int:
        """The stage that ``step`` belongs to (the last stage for every step past its start)."""
        stage = 0
        while stage + 1 < self.stages and step >= self.stage_start(stage + 1):
            stage += 1
        return stage

    def is_stage_start(self, step: int) -> bool:
        """Whether ``step`` is the first step of a stage after the first."""
        return step > 0 and self.stage_start(self.stage_of(step)) == step

    def lr_factor(self, stage: int) -> float:
        return self.lr_decay**stage

    def zo_eps(self, stage: int) -> float:
        if self.stages == 1 or stage <= 0:
            return float(self.zo_eps_start)
        if stage >= self.stages - 1:
            return float(self.zo_eps_end)
        a, b = math.log(self.zo_eps_start), math.log(self.zo_eps_end)
        return math.exp(a + stage / (self.stages - 1) * (b - a))


# ---------------------------------------------------------------------------------------------- data-free pruning
_PRUNING_DOMAIN = 0x5F0A

PRUNING_SCORES = ("zo_hessian", "magnitude")


def constant_input_objective(module: nn.Module, token_id: int = 1) -> Tensor:
    """The data-free objective of the pruning score: the sum of the network's outputs on a constant input.

    Hugging Face models (the first submodule with a ``config.vocab_size``) get ``input_ids = [[token_id]]`` (one
    token, as DP-ZOPO); other modules get ``ones_like(module.example_input_array)``. Anything else is an error:
    pass your own ``objective`` (a function of the module that returns a scalar, reading no data).
    """
    hf = next((m for m in module.modules() if hasattr(getattr(m, "config", None), "vocab_size")), None)
    device = next(module.parameters()).device
    if hf is not None:
        out = hf(input_ids=torch.full((1, 1), int(token_id), dtype=torch.long, device=device))
        out = getattr(out, "logits", None) if not isinstance(out, Tensor) else out
        if out is None:
            raise ValueError(f"{type(hf).__name__} returned no logits: pass `objective=` to the pruning")
        return out.double().sum()
    example = getattr(module, "example_input_array", None)
    if isinstance(example, Tensor):
        if example.is_floating_point():
            x = torch.ones_like(example, device=device)
        else:
            x = torch.full_like(example, int(token_id), device=device)
        out = module(x)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"{type(module).__name__}(example_input_array) returned {type(out).__name__}, not a tensor"
            )
        return out.double().sum()
    raise ValueError(
        f"no constant input is known for {type(module).__name__}: it holds no Hugging Face model and has no "
        "`example_input_array` tensor. Pass `objective=lambda module: ...` (a scalar computed from a constant input)."
    )


def data_free_mask(
    module: nn.Module,
    params: Sequence[Tensor],
    fraction: float,
    score: str = "zo_hessian",
    *,
    seed: int = 0,
    zo_eps: float = 1e-3,
    num_queries: int = 1,
    keep: str = "smallest",
    objective: Callable[[nn.Module], Tensor] | None = None,
) -> list[Tensor]:
    """The trainable coordinates of ``params`` (parameters of ``module``) chosen without any data: a compact list
    of flat indices per parameter (int32, sorted), ``max(1, round(fraction · Σ numel))`` coordinates in all.

    Scores (computed under ``no_grad``, module in ``eval()`` mode, never reading a dataset):

    * ``"magnitude"``: ``|θ|``.
    * ``"zo_hessian"`` (DP-ZOPO, Liu et al. arXiv 2402.07818): the network is sign-linearized (every floating
      parameter replaced by ``|θ|``, as in SynFlow) and evaluated on a constant input (``objective``, default
      :func:`constant_input_objective`, a scalar R). With q = ``num_queries`` seeded directions z_j over ``params``,
      the ZO gradient ĝ = (1/q)·Σ_j g_j z_j with ``g_j = (R(θ + λz_j) − R(θ − λz_j))/2λ`` is estimated at θ and,
      along the same directions, at θ' = θ + c·ĝ (c = λ / rms(ĝ): each coordinate moves by about λ); their
      difference estimates the Hessian-gradient product ``Hĝ ≈ (1/(q·c))·Σ_j (g'_j − g_j) z_j`` and the score is
      ``Hĝ ⊙ |θ|`` (a zeroth-order, data-free GraSP score). Sharing the directions between the two estimates (common
      random numbers) removes most of the variance that independent directions would add.

    ``keep="smallest"`` (default, as DP-ZOPO) trains the coordinates with the smallest ``|score|``; ``"largest"``
    the others. The model is left bit-identical: the linearized network is a set of temporary tensors swapped in
    through ``.data`` and swapped back (the scoring holds one transient copy of the module's floating parameters,
    plus one score tensor the size of the largest parameter and the running selection of ``k`` candidates; nothing
    parameter-sized is kept).
    """
    if score not in PRUNING_SCORES:
        raise ValueError(f"`score` must be one of {PRUNING_SCORES}, got {score!r}")
    if keep not in ("smallest", "largest"):
        raise ValueError(f"`keep` must be 'smallest' or 'largest', got {keep!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
    if num_queries < 1:
        raise ValueError(f"`num_queries` must be >= 1, got {num_queries!r}")
    params = list(params)
    total = sum(p.numel() for p in params)
    k = max(1, min(total, round(fraction * total)))
    selection = _RunningTopK(k, largest=keep == "largest")
    with torch.no_grad():
        if score == "magnitude":
            for t, p in enumerate(params):
                selection.add(t, p.detach().abs().reshape(-1))
        else:
            _linearized_hessian_scores(module, params, seed, zo_eps, num_queries, objective, selection)
    return selection.indices(params)


def _linearized_hessian_scores(
    module: nn.Module,
    params: list[Tensor],
    seed: int,
    zo_eps: float,
    num_queries: int,
    objective: Callable[[nn.Module], Tensor] | None,
    selection: _RunningTopK,
) -> None:
    """Feed the ``zo_hessian`` score of each parameter to ``selection`` (see :func:`data_free_mask`)."""
    objective = objective or constant_input_objective
    swapped: list[tuple[Tensor, Tensor]] = []
    was_training = module.training
    module.eval()
    try:
        for p in module.parameters():
            if p.is_floating_point():
                swapped.append((p, p.data))
                p.data = p.data.abs()  # the linearized network: temporary tensors, the originals stay untouched
        ids = {id(p) for p, _ in swapped}
        if any(id(p) not in ids for p in params):
            raise ValueError("the parameters to score must be floating-point parameters of the module")
        directions = SeededDirections(params, mix_seed(_PRUNING_DOMAIN, seed))
        seeds = [directions.seed_for(0, j) for j in range(num_queries)]

        def directional_derivatives() -> list[float]:
            out = []
            for s in seeds:
                directions.move_to(s, zo_eps)
                plus = float(objective(module))
                directions.move_to(s, -zo_eps)
                minus = float(objective(module))
                out.append((plus - minus) / (2 * zo_eps))
            directions.restore()
            return out

        def materialize(p: Tensor, offset: int, coefficients: Sequence[float]) -> Tensor:
            """Σ_j coefficients[j]·z_j over parameter ``p`` (fp32, flat), accumulated in place."""
            acc = None
            for s, c in zip(seeds, coefficients):
                z = normal_stream(s, offset, p.numel(), p.device).mul_(c)
                acc = z if acc is None else acc.add_(z)
            return acc

        g1 = directional_derivatives()
        # rms of ĝ = (1/q) Σ_j g_j z_j, one parameter at a time
        sq = sum(
            float(torch.linalg.vector_norm(materialize(p, o, [g / num_queries for g in g1]), dtype=torch.float64) ** 2)
            for p, o in zip(params, directions.offsets)
        )
        rms = math.sqrt(sq / max(1, sum(p.numel() for p in params)))
        if not rms > 0 or not math.isfinite(rms):
            raise ValueError(
                f"the data-free ZO gradient of the objective is {rms} (not finite, or zero): the score is undefined; "
                "use score='magnitude' or another `objective`"
            )
        c = zo_eps / rms
        for s, g in zip(seeds, g1):
            perturb_(directions.params, directions.offsets, s, c * g / num_queries)
        g2 = directional_derivatives()
        diff = [(b - a) / (num_queries * c) for a, b in zip(g1, g2)]
        originals = {id(p): data for p, data in swapped}
        for t, (p, o) in enumerate(zip(params, directions.offsets)):
            score = materialize(p, o, diff).mul_(originals[id(p)].reshape(-1)).abs_()  # |Hĝ ⊙ |θ|| = |Hĝ ⊙ θ|
            selection.add(t, score)
            del score
    finally:
        for p, data in swapped:
            p.data = data
        module.train(was_training)


class _RunningTopK:
    """Global selection of ``k`` coordinates by score (smallest or largest) over parameters fed one at a time, in
    O(k + largest parameter) memory: each parameter's top k is merged into the running top k."""

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.values = torch.empty(0, dtype=torch.float64)
        self.tensor = torch.empty(0, dtype=torch.int64)
        self.index = torch.empty(0, dtype=torch.int64)

    def add(self, t: int, scores: Tensor) -> None:
        s = scores.detach().reshape(-1)
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"the pruning score of parameter {t} is not finite")
        v, i = torch.topk(s, min(self.k, s.numel()), largest=self.largest, sorted=False)
        self.values = torch.cat([self.values, v.cpu().double()])
        self.tensor = torch.cat([self.tensor, torch.full((v.numel(),), t, dtype=torch.int64)])
        self.index = torch.cat([self.index, i.cpu()])
        if self.values.numel() > self.k:
            v, order = torch.topk(self.values, self.k, largest=self.largest, sorted=False)
            self.values, self.tensor, self.index = v, self.tensor[order], self.index[order]

    def indices(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [
            torch.sort(self.index[self.tensor == t]).values.to(
                device=p.device, dtype=torch.int32 if p.numel() <= 2**31 - 1 else torch.int64
            )
            for t, p in enumerate(params)
        ]
