"""DP-SGD with per-example clipping by book-keeping: ONE backward pass, no second backward, no ``[B, P]`` tensor for
the supported layers.

During the forward pass, a forward hook on every module that owns a trainable parameter stores the module's input
``a`` (detached) and registers a tensor hook on its output that stores the output gradient ``g``. After one backward
of ``Σ_i ℓ_i``:

* per-example squared norms are computed per parameter, without per-example gradients where possible:
  ``nn.Linear`` / transformers ``Conv1D`` weights by the factor form (:func:`custom_kernels.clip_noise.factor_sq_norms`:
  ``||a_i||·||g_i||`` for 2-D inputs, the Gram "ghost" norm or the explicit ``g_iᵀ a_i`` for 3-D inputs, whichever
  is smaller), ``nn.Embedding`` by the token-match Gram ``Σ_{t,s} 1[x_t = x_s ≠ pad] ⟨g_t, g_s⟩``; biases, norms
  (``LayerNorm``, HF ``*RMSNorm``) and layers handled by Opacus's registered grad samplers are instantiated
  (``[B, *shape]``, small);
* ``c_i = min(1, C / (||∇_i|| + 1e-6))`` over all parameters jointly (flat clipping);
* ``Σ_i c_i ∇_i`` is written per parameter into one flat fp32 buffer (book-keeping: from the stored ``a``, ``g``),
  Gaussian noise ``σC`` is fused into the same pass on the rank that adds it.

Memory (bk): a module whose per-example gradients are all instantiated and small (``LayerNorm``, RMSNorm, Opacus
layers, a linear layer with a frozen weight) gets them formed in its output-gradient hook, which then frees its
stored input and output gradient during backward. The flat buffer is allocated only after the first step's check has
consumed autograd's gradients, uninitialized (every slice is overwritten; on the CPU its pages become resident as they
are written), and filled smallest parameter first, freeing each use's stored tensors once its last parameter is
written, so that a large slice (a word embedding and its noise) is written when little else is left.

Non-finite examples: an example whose squared norm is NaN or inf (a NaN/inf loss or input) gets ``c_i = 0`` and
contributes exactly nothing: as ``0 · NaN = NaN``, its rows of the stored factors, output gradients and instantiated
per-example gradients are zeroed before they enter the sum (copies, made only on a step that has such an example).
The release is then that of the batch without it, so one record cannot turn the whole released gradient into NaN.
Their count is reported in :attr:`DPSGDStepResult.nonfinite` (not private: for debugging only).

Ghost mode (``mode="ghost"``, the memory of non-private training): a first backward streams the per-example norms
from the output gradients and frees each one at once; a second backward of ``Σ_i c_i ℓ_i``, also stopped at the
hooked outputs, hands each hook an output gradient that already carries ``c_i``, and the hook adds that use's
``Σ_i c_i ∇_i`` (book-keeping from its ``a``) into the flat buffer and frees it. The released sum is formed only from
what the hooks decompose: autograd's ``.grad`` is never read, as in bk mode after the first step.

Physical batches (a logical batch larger than memory, run in chunks): each chunk's forward and backward run in turn
and :meth:`BookKeepingDPSGD.accumulate` adds its clipped sum into the flat buffer (``c_i`` is per example, so the
chunks' sums add up to the batch's), freeing its stored inputs and output gradients before the next chunk's forward;
:meth:`BookKeepingDPSGD.private_sum` of the last chunk adds its sum, the noise (once) and the all-reduce.

Tied parameters (one parameter used by several modules, or one module called several times, e.g. GPT-2's
``wte``/``lm_head``): the per-example gradient is the sum over uses, so its norm is not the sum of per-use norms.
For such a parameter the per-example gradient of every use is instantiated (``[B, *shape]``, e.g. ``B × V × d`` for a
tied embedding: the memory of ``B`` copies of that parameter) and the uses are added before the norm is taken.

A check on the first step (:meth:`BookKeepingDPSGD._verify`, run by the strategy) compares ``Σ_i ∇_i`` rebuilt
from the hooks with autograd's gradient and raises if a parameter is used outside its module. It needs finite
values: on a step with a non-finite norm or gradient it is skipped and :attr:`DPSGDStepResult.verified` is False,
so the strategy checks again on its next step. Later steps call
:meth:`BookKeepingDPSGD.backward_to_outputs`, which backpropagates only as far as the hooked outputs: autograd's
weight-gradient GEMMs, which the clipped sum replaces, are skipped. Layers that share an input (query, key,
value) compute its Gram matrix once per step.

Assumptions (as in Opacus): every hooked module sees batch-first inputs whose dim 0 is the example index (a
module whose output has batch dim 1 while the batch has ``B > 1`` examples, e.g. shared ``position_ids``, is
expanded to ``B`` in its forward hook so its per-example gradients exist), and trainable parameters are used only
through the modules that own them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from custom_kernels.clip_noise import (
    clip_and_noise_,
    clip_coefficients,
    factor_sq_norms,
    factor_workspace_numel,
    gram,
    gram_dot,
    noise_,
    scale_examples,
    symmetric_panels,
    uses_gram,
)
from lightning_dp.errors import UnsupportedLayerError
from lightning_dp.mechanisms.collective import Collective

__all__ = ["CLIPPING_MODES", "BookKeepingDPSGD", "DPSGDStepResult", "UnsupportedLayerError"]

_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
CLIPPING_MODES = ("bk", "ghost")


@dataclass
class DPSGDStepResult:
    """What one private step released (on every rank): the clipped sum and noise are global (after the all-reduce).

    ``nonfinite`` is a NON-PRIVATE diagnostic: the number of this rank's examples whose per-example norm was NaN or
    inf and that were given clip factor 0 (left out of the sum). It reveals something about the sampled records: it
    is for the user's debugging only, never to be logged or released (like ``sq_norms``).

    ``verified``: this step ran the first-step check (the hooks' ``Σ_i ∇_i`` against autograd's gradient) on finite
    values and it passed. False when no check ran, or when it could not run (non-finite norms or gradient): the
    strategy should then check again on its next step.
    """

    num_examples: int  # examples on this rank
    clipped_fraction: float  # fraction of this rank's examples with c_i < 1 (non-finite ones included: c_i = 0)
    noise_std: float
    sq_norms: Tensor | None = field(default=None, repr=False)  # this rank's per-example squared norms (not private)
    nonfinite: int = field(default=0, repr=False)  # NOT private: see the class docstring
    verified: bool = False

    @classmethod
    def merge(cls, parts: list[DPSGDStepResult]) -> DPSGDStepResult:
        """One step's result from those of its chunks (:meth:`BookKeepingDPSGD.accumulate`, then the
        :meth:`~BookKeepingDPSGD.private_sum` of the last one): counts add up, the norms are concatenated, the noise
        is the release's, and the step is ``verified`` only if every chunk was."""
        if len(parts) == 1:
            return parts[0]
        n = sum(r.num_examples for r in parts)
        norms = [r.sq_norms for r in parts if r.sq_norms is not None]
        return cls(
            num_examples=n,
            clipped_fraction=sum(r.clipped_fraction * r.num_examples for r in parts) / n if n else 0.0,
            noise_std=parts[-1].noise_std,
            sq_norms=torch.cat(norms) if norms else None,
            nonfinite=sum(r.nonfinite for r in parts),
            verified=all(r.verified for r in parts),
        )


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` ``[d_in, d_out]``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _is_hf_rmsnorm(module: nn.Module) -> bool:
    """HF-style RMSNorm (Llama, T5, Mistral...): ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``."""
    return (
        type(module).__name__.endswith("RMSNorm")
        and hasattr(module, "variance_epsilon")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 1
        and len(list(module.parameters(recurse=False))) == 1
    )


def _opacus_sampler(module: nn.Module) -> Any:
    try:
        from opacus.grad_sample import GradSampleModule
    except ImportError:  # pragma: no cover - opacus is a dependency
        return None
    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


def _kind(module: nn.Module) -> str:
    if isinstance(module, _BATCH_MIXING):
        raise UnsupportedLayerError(
            f"{type(module).__name__} mixes the examples of a batch (its output for one example depends on the "
            "others), so per-example gradients and DP-SGD's guarantee do not exist for it. Replace it with GroupNorm "
            "or LayerNorm (e.g. `opacus.validators.ModuleValidator.fix(model)`). Freezing it is not enough: in train "
            "mode it normalizes each example with statistics of the whole batch."
        )
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        if module.max_norm is not None:
            raise UnsupportedLayerError("nn.Embedding(max_norm=...) renormalizes rows in place: not supported")
        return "embedding"
    if type(module) is nn.LayerNorm:
        return "layernorm"
    if _is_hf_rmsnorm(module):
        return "hf_rmsnorm"
    if _opacus_sampler(module) is not None:
        return "opacus"
    raise UnsupportedLayerError(type(module).__name__)


class _Use:
    __slots__ = ("a", "dense", "edge", "g")

    def __init__(self, a: Any) -> None:
        self.a = a
        self.edge: Any = None  # the output's autograd edge: backward can stop there (no weight-gradient GEMMs)
        self.g: Tensor | None = None
        # bk mode, modules whose per-example gradients are all smaller than their stored input and output gradient
        # (norms, small embeddings, ...): id(p) -> [B, *p.shape], formed in the output-gradient hook, which then
        # frees `a` and `g` at once instead of holding them until the clipped sum
        self.dense: dict[int, Tensor] | None = None


class BookKeepingDPSGD:
    """Per-example clipped, noised gradient of a module's trainable parameters from one backward pass (``"bk"``) or
    from two backward passes stopped at the hooked outputs (``"ghost"``, see :class:`_GhostStep`).

    An example with a non-finite per-example norm gets clip factor 0 and contributes exactly zero (module docstring).

    Args:
        module: the model (e.g. the LightningModule); every parameter with ``requires_grad`` is privatized.
        clip: C.
        verify_rtol: relative tolerance of the check in :meth:`_verify` (loose enough for bf16 autocast).
        mode: ``"bk"`` or ``"ghost"``.
    """

    def __init__(self, module: nn.Module, clip: float, verify_rtol: float = 1e-2, mode: str = "bk") -> None:
        if mode not in CLIPPING_MODES:
            raise ValueError(f"mode must be one of {CLIPPING_MODES}, got {mode!r}")
        self.mode = mode
        self.clip = float(clip)
        self.verify_rtol = float(verify_rtol)
        self.params: list[nn.Parameter] = []
        modules: dict[int, tuple[str, nn.Module, str]] = {}
        unsupported: list[str] = []
        for name, mod in module.named_modules():
            if isinstance(mod, _BATCH_MIXING):
                _kind(mod)  # raises, even when frozen: in train mode it mixes the examples of a batch
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            try:
                kind = _kind(mod)
            except UnsupportedLayerError as err:
                if str(err) != type(mod).__name__:
                    raise
                unsupported.append(f"{name or '<root>'} ({type(mod).__name__})")
                continue
            modules[id(mod)] = (name, mod, kind)
        if unsupported:
            raise UnsupportedLayerError(
                "DP-SGD cannot compute per-example gradients for the trainable parameters of: "
                + ", ".join(unsupported)
                + ". Supported: nn.Linear, nn.Embedding, nn.LayerNorm, transformers Conv1D, HF *RMSNorm, and module "
                "types with an Opacus grad sampler (opacus.grad_sample.register_grad_sampler). Freeze them "
                "(requires_grad=False) or register a grad sampler for them."
            )
        seen: set[int] = set()
        self._named: list[tuple[str, nn.Parameter]] = []
        for n, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
                self._named.append((n, p))
        if not self.params:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
        self._modules = list(modules.values())
        self._sizes = [p.numel() for p in self.params]
        self._offsets = [0]
        for n in self._sizes[:-1]:
            self._offsets.append(self._offsets[-1] + n)
        self.numel = sum(self._sizes)
        # bk mode writes the clipped sums smallest parameter first: the stored inputs and output gradients of the
        # many small ones are freed before a large one (e.g. a word embedding) needs its slice and its noise
        self._write_order = sorted(range(len(self.params)), key=lambda k: self._sizes[k])
        self._uses: dict[int, list[_Use]] = {id(m): [] for _, m, _ in self._modules}
        self.capturing = False
        self.batch_size: int | None = None
        self._opacus_cache: dict[int, dict[Any, Tensor]] = {}
        self._info = {id(m): (name, kind) for name, m, kind in self._modules}
        self._ghost: _GhostStep | None = None  # ghost mode: the step whose backward passes are running
        self._ghost_result: _GhostStep | None = None  # ghost mode: the finished step, read by private_sum
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m, _ in self._modules]

    # ------------------------------------------------------------------ hooks
    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Drop everything the hooks stored. Each use's fields are cleared too: its output's autograd node holds the
        hook that holds the use, and the use holds that node's edge, a cycle that would keep the stored inputs alive
        after a checked (ordinary) backward, which does not clear the edges."""
        for uses in self._uses.values():
            for use in uses:
                use.a, use.g, use.edge, use.dense = (), None, None, None
            uses.clear()
        self._opacus_cache.clear()
        self._ghost = None
        self._ghost_result = None

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not (self.capturing and torch.is_grad_enabled()):
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        a = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
        use = _Use(a)
        b = self.batch_size
        if b is not None and b > 1 and output.dim() > 0 and output.shape[0] == 1:
            # shared input (e.g. position_ids [1, T]) broadcast over the batch: expand so per-example grads exist
            output = output.expand(b, *output.shape[1:])
            use.a = tuple(x.expand(b, *x.shape[1:]) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 1
                          else x for x in a)
        use.edge = get_gradient_edge(output)
        self._uses[id(module)].append(use)

        def store(grad: Tensor) -> None:
            if self._ghost is not None:
                self._ghost.on_output_grad(module, use, grad.detach())
            elif self.mode == "bk":
                if use.dense is not None:
                    raise RuntimeError(f"DP-SGD: the output of {self._info[id(module)][0] or '<root>'} received two "
                                       "gradients in one backward")
                use.g = grad.detach() if use.g is None else use.g + grad.detach()
                if self._eager(module):
                    self._instantiate(module, use)

        output.register_hook(store)
        return output

    def backward(self, losses: Tensor, verify: bool) -> dict[int, Tensor] | None:
        """Backward pass(es) of one step for per-example ``losses`` ``[B]`` (the forward ran with ``capturing``).

        ``bk``: one backward of ``Σ_i ℓ_i`` that stores the output gradients (with ``verify``: an ordinary backward
        whose ``.grad`` is returned as the reference for :meth:`private_sum`'s check; otherwise
        :meth:`backward_to_outputs`). ``ghost``: a first backward (to the hooked outputs; with ``verify`` an
        ordinary one, checked here) streams every per-example norm and frees each output gradient at once, then a
        second backward of ``Σ_i c_i ℓ_i``, also stopped at the hooked outputs, whose hooks add each use's
        ``Σ_i c_i ∇_i`` into the flat buffer that :meth:`private_sum` noises (``.grad`` is never read).
        """
        total = losses.sum()
        if self.mode == "bk":
            if not verify:
                self.backward_to_outputs(total)
                return None
            total.backward()
            return {id(p): p.grad for p in self.params if p.grad is not None}
        ghost = self._ghost = _GhostStep(self, int(losses.shape[0]), losses.device, verify)
        try:
            # first pass: the norms (the graph, the hooked outputs' edges and the stored inputs are kept)
            if verify:
                total.backward(retain_graph=True)
            else:
                self.backward_to_outputs(total, retain_graph=True)
            ghost.finish()
            if verify:
                ghost.verify({id(p): p.grad for p in self.params if p.grad is not None})
            self.clear_grads()
            # second pass: Σ_i c_i ℓ_i to the hooked outputs only; each output gradient carries c_i
            ghost.start_sum()
            self.backward_to_outputs((losses * ghost.coeffs.to(losses.dtype)).sum())
        finally:
            self._ghost = None
        self.reset()
        self._ghost_result = ghost
        return None

    def backward_to_outputs(self, total: Tensor, retain_graph: bool = False) -> None:
        """Backpropagate ``total`` (``Σ_i ℓ_i``) only as far as the hooked modules' outputs need.

        The output gradients ``g`` are all the book-keeping needs; autograd's own parameter gradients (one GEMM per
        linear layer, about a third of a training step's compute) are not computed and ``.grad`` is not touched.
        Use it once :meth:`_verify` has checked, on a step with an ordinary backward, that the hooks account for
        every trainable parameter's gradient. With ``retain_graph`` the edges are kept for another pass (ghost mode).
        """
        edges = [use.edge for uses in self._uses.values() for use in uses if use.edge is not None]
        if edges and total.requires_grad:
            # `backward` (not `grad`) with edges as inputs: it accumulates nowhere and captures nothing, so each
            # output gradient lives only as long as a hook keeps it (ghost mode keeps none)
            torch.autograd.backward(total, inputs=edges, retain_graph=retain_graph)
        if not retain_graph:
            for uses in self._uses.values():
                for use in uses:
                    use.edge = None

    # ------------------------------------------------------------------ per-example pieces
    def _eager(self, module: nn.Module) -> bool:
        """bk mode: whether every trainable parameter of ``module`` is instantiated (``[B, *p.shape]``) and smaller
        than what it is formed from, so that it is formed as soon as the output gradient arrives (LayerNorm,
        RMSNorm, Opacus layers, linear layers with a frozen weight, embeddings with fewer rows than the tokens of an
        example)."""
        if self.batch_size is None:
            return False
        kind = self._info[id(module)][1]
        if kind in ("layernorm", "hf_rmsnorm", "opacus"):
            return True
        if kind in ("linear", "conv1d"):
            return not module.weight.requires_grad
        return False

    def _instantiate(self, module: nn.Module, use: _Use) -> None:
        """Form the per-example gradients of ``module``'s trainable parameters for this use and free ``a``, ``g``."""
        name, kind = self._info[id(module)]
        self._check(name, module, use, self.batch_size)
        use.dense = {id(p): self._dense(kind, module, use, p) for p in module.parameters(recurse=False)
                     if p.requires_grad}
        self._opacus_cache.pop(id(use), None)
        use.a, use.g = (), None
    def _check(self, name: str, module: nn.Module, use: _Use, batch: int) -> None:
        x = use.a[0] if use.a else None
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch or use.g.shape[0] != batch:
            shape = None if not isinstance(x, Tensor) else tuple(x.shape)
            raise RuntimeError(
                f"DP-SGD: module {name or '<root>'} ({type(module).__name__}) was called with an input of shape "
                f"{shape} whose first dimension is not the batch of {batch} examples; per-example gradients need "
                "batch-first inputs."
            )

    def _dense(self, kind: str, module: nn.Module, use: _Use, p: nn.Parameter) -> Tensor:
        """The per-example gradient ``[B, *p.shape]`` (fp32) of one parameter ``p`` of ``module`` for one use."""
        g = use.g.float()
        x = use.a[0]
        if kind in ("linear", "conv1d"):
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            if p is module.bias:
                return g3.sum(1)
            a3 = x.float().reshape(x.shape[0], -1, x.shape[-1])
            return torch.einsum("btp,btd->bpd" if kind == "linear" else "btp,btd->bdp", g3, a3)
        if kind == "embedding":
            ids = x.reshape(x.shape[0], -1)
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            if module.padding_idx is not None:
                g3 = g3 * (ids != module.padding_idx).unsqueeze(-1)
            b, v, d = ids.shape[0], module.num_embeddings, g3.shape[-1]
            dense = torch.zeros(b, v, d, device=g.device, dtype=torch.float32)
            return dense.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), g3)
        if kind == "layernorm":
            dims = tuple(range(-len(module.normalized_shape), 0))
            red = tuple(range(1, x.dim() - len(dims)))
            if p is module.bias:
                return g.sum(red) if red else g
            normed = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
            gx = g * normed
            return gx.sum(red) if red else gx
        if kind == "hf_rmsnorm":
            a = x.float()
            normed = (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype).float()
            red = tuple(range(1, a.dim() - 1))
            return (g * normed).sum(red) if red else g * normed
        # a module type with an Opacus grad sampler (computes all of the module's trainable parameters at once)
        result = self._opacus_cache.get(id(use))
        if result is None:
            result = _opacus_sampler(module)(module, [t for t in use.a if isinstance(t, Tensor)], use.g)
            self._opacus_cache[id(use)] = result
        return result.pop(p).float()

    # ------------------------------------------------------------------ the private gradient
    @torch.no_grad()
    def private_sum(
        self,
        batch: int,
        noise_std: float,
        collective: Collective,
        device: torch.device,
        reference_grads: dict[int, Tensor] | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, DPSGDStepResult]:
        """``Σ_i c_i ∇_i`` (+ N(0, noise_std²) on rank 0), all-reduced (SUM) over ranks, as one flat fp32 buffer.

        The release of a step: call it once per step, after the backward of the step's last (or only) chunk.

        Args:
            batch: the examples of the chunk whose backward just ran (0: an empty batch, only noise).
            noise_std: σC, the std of the noise (fused into the pass that writes the chunk's clipped sum).
            collective: the ranks' all-reduce.
            device: where the flat buffer lives.
            reference_grads: ``id(p) -> autograd's gradient of Σ_i ℓ_i``: if given, check first that the hooks
                account for all of it (see :meth:`_verify`). Consumed: each entry is removed once checked (so it is
                freed before the flat buffer is allocated).
            out: the clipped sums of the step's earlier chunks (from :meth:`accumulate`), to which this chunk's sum
                and the noise are added; ``None``: a single chunk.
        """
        seed = secrets.randbits(63) if noise_std > 0 and collective.rank == 0 else None
        std = noise_std if seed is not None else 0.0
        flat, result = self._clipped_sum(batch, device, reference_grads, out, std, seed)
        collective.all_reduce_sum(flat)
        result.noise_std = float(noise_std)
        return flat, result

    @torch.no_grad()
    def accumulate(
        self,
        batch: int,
        device: torch.device,
        reference_grads: dict[int, Tensor] | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, DPSGDStepResult]:
        """``out <- out + Σ_i c_i ∇_i`` of the chunk whose backward just ran: no noise, no all-reduce (the step's
        :meth:`private_sum` adds them once, with its last chunk). Clip factors are per example, so the sum over the
        chunks is the clipped sum of the whole batch.

        Args:
            batch: the examples of the chunk (> 0).
            device: where the flat buffer lives.
            reference_grads: as in :meth:`private_sum` (the check of the first step, per chunk).
            out: the flat fp32 buffer of the earlier chunks' sums; ``None``: a new one.
        """
        if batch <= 0:
            raise ValueError(f"a chunk to accumulate needs examples, got {batch}")
        return self._clipped_sum(batch, device, reference_grads, out, 0.0, None)

    def _clipped_sum(
        self,
        batch: int,
        device: torch.device,
        reference_grads: dict[int, Tensor] | None,
        out: Tensor | None,
        std: float,
        seed: int | None,
    ) -> tuple[Tensor, DPSGDStepResult]:
        """``Σ_i c_i ∇_i`` of the chunk (+ ``std · ξ(seed)``) written into ``out`` (added) or a new zero buffer."""
        if out is not None and (out.dtype != torch.float32 or out.numel() != self.numel):
            raise ValueError(f"`out` must be a flat float32 buffer of {self.numel} elements")
        if self.mode == "ghost":
            return self._ghost_clipped_sum(batch, device, out, std, seed)
        sq = torch.zeros(batch, dtype=torch.float32, device=device)
        # plans[id(p)]: ("factors", a, g) | ("dense", G) | ("embedding", ids, g, padding_idx)
        plans: dict[int, tuple] = {}
        uses_of: dict[int, list[tuple[str, nn.Module, str, _Use]]] = {}
        if batch > 0:
            for name, mod, kind in self._modules:
                for use in self._uses[id(mod)]:
                    if use.g is None and use.dense is None:  # output did not reach the loss
                        continue
                    if use.dense is None:  # (formed per-example gradients were checked in the hook)
                        self._check(name, mod, use, batch)
                    for p in mod.parameters(recurse=False):
                        if p.requires_grad:
                            uses_of.setdefault(id(p), []).append((name, mod, kind, use))
            factored = {}  # singly used parameters whose norms need no per-example gradient
            for p in self.params:
                uses = uses_of.get(id(p), [])
                if len(uses) == 1 and uses[0][3].dense is None:
                    _, mod, kind, use = uses[0]
                    plan = self._factored(kind, mod, p, use)
                    if plan is not None:
                        factored[id(p)] = plan
                        if plan[0] == "factors":  # the use keeps the plan's (contiguous) factors, not two copies
                            a, g = (plan[1], plan[2]) if kind == "linear" else (plan[2], plan[1])
                            use.a, use.g = (a, *use.a[1:]), g
            shared = _SharedInputGrams(list(factored.values()))
            for p in self.params:
                uses = uses_of.get(id(p), [])
                if not uses:
                    continue
                plan = factored.get(id(p))
                if plan is not None:
                    plans[id(p)] = plan
                    if plan[0] == "factors":
                        sq += factor_sq_norms(plan[1], plan[2], a_gram=shared.get(plan[1]), g_gram=shared.get(plan[2]))
                    else:
                        sq += _embedding_sq_norms(plan[1], plan[2], plan[3], g_gram=shared.get(plan[2]))
                    continue
                # several uses (tied parameter) or a small parameter (bias, norm): per-example gradients, instantiated
                total = None
                for name, mod, kind, use in uses:
                    gs = use.dense.pop(id(p)) if use.dense is not None else self._dense(kind, mod, use, p)
                    total = gs if total is None else total.add_(gs)
                plans[id(p)] = ("dense", total.reshape(batch, -1).contiguous())
                sq += plans[id(p)][1].square().sum(1)
            del shared, factored
        coeffs = clip_coefficients(sq, self.clip) if batch > 0 else sq
        # an example whose norm is not finite (NaN/inf loss or input) has c_i = 0; as 0 · NaN = NaN, its rows of the
        # factors / per-example gradients are also zeroed before the sum (a copy, made only when there is one)
        bad = ~torch.isfinite(sq)
        nonfinite = int(bad.sum())
        verified = False
        if reference_grads is not None and batch > 0 and not nonfinite:  # with a non-finite norm: check next step
            verified = self._verify(plans, reference_grads, batch, device)
        if nonfinite:
            plans = {k: _drop_rows(plan, bad) for k, plan in plans.items()}
        # the flat buffer is allocated only now (the check above has consumed autograd's gradients) and uninitialized
        # (every slice is overwritten below; on the CPU its pages become resident only as they are written), and each
        # use's stored input and output gradient are freed as soon as the last of its parameters is written
        flat = torch.empty(self.numel, dtype=torch.float32, device=device) if out is None else out
        # one scratch for every layer's scaled factor (torch path) and embedding rows, instead of a factor-sized
        # temporary each: on the CPU a fresh temporary costs page faults as well as its writes
        ws_numel = _workspace_numel(plans.values())
        workspace = torch.empty(ws_numel, dtype=torch.float32, device=device) if ws_numel else None
        pending: dict[int, int] = {}
        for uses in uses_of.values():
            for use in uses:
                pending[id(use[3])] = pending.get(id(use[3]), 0) + 1
        for k in self._write_order:
            p, off, n = self.params[k], self._offsets[k], self._sizes[k]
            _write(flat[off:off + n], p, plans.pop(id(p), None), coeffs, std, seed, off, accumulate=out is not None,
                   workspace=workspace)
            for *_, use in uses_of.pop(id(p), ()):
                pending[id(use)] -= 1
                if not pending[id(use)]:
                    self._opacus_cache.pop(id(use), None)
                    use.a, use.g = (), None
        clipped = float((coeffs < 1).float().mean().item()) if batch > 0 else 0.0
        self.reset()
        return flat, DPSGDStepResult(batch, clipped, 0.0, sq, nonfinite, verified)

    def _ghost_clipped_sum(self, batch: int, device: torch.device, out: Tensor | None, std: float,
                           seed: int | None) -> tuple[Tensor, DPSGDStepResult]:
        """Ghost mode: :meth:`backward`'s hooks wrote ``Σ_i c_i ∇_i`` into per-parameter buffers; add them (and the
        noise) into the flat buffer."""
        ghost, self._ghost_result = self._ghost_result, None
        if batch > 0:
            if ghost is None or ghost.batch != batch:
                raise RuntimeError("DP-SGD ghost clipping: private_sum without a matching backward(losses)")
            flat = ghost.assemble(device, out)
        else:
            flat = torch.zeros(self.numel, dtype=torch.float32, device=device) if out is None else out
        if std:
            for p, off, n in zip(self.params, self._offsets, self._sizes):
                _write(flat[off:off + n], p, None, None, std, seed, off, accumulate=True)
        self.clear_grads()
        self.reset()
        if batch == 0:
            return flat, DPSGDStepResult(0, 0.0, 0.0, torch.zeros(0, device=device))
        clipped = float((ghost.coeffs < 1).float().mean().item())
        return flat, DPSGDStepResult(batch, clipped, 0.0, ghost.sq, ghost.nonfinite, ghost.verified)

    def _verify(self, plans: dict[int, tuple], reference: dict[int, Tensor], batch: int, device: torch.device) -> bool:
        """Σ_i ∇_i rebuilt from the hooks must equal autograd's gradient of Σ_i ℓ_i (catches parameters used
        outside the modules that own them, e.g. ``F.linear(x, emb.weight)``, whose per-example gradients would be
        wrong)."""
        ones = torch.ones(batch, dtype=torch.float32, device=device)

        def rebuilt(p: nn.Parameter) -> Tensor:
            mine = torch.zeros(p.numel(), dtype=torch.float32, device=device)
            _write(mine, p, plans.get(id(p)), ones, 0.0, None, 0)
            return mine

        return self._check_sums(rebuilt, reference)

    def _check_sums(self, rebuilt: Any, reference: dict[int, Tensor]) -> bool:
        """Raise if ``rebuilt(p)`` (``Σ_i ∇_i`` from the hooks, flat fp32) differs from autograd's ``reference``.

        Returns True when checked, False when it cannot be checked (``reference`` not finite: the caller checks again
        on a later step). A comparison with NaN never passes."""
        refs = [g.detach().float().norm() for g in reference.values()]
        if refs and not bool(torch.isfinite(torch.stack(refs)).all()):
            return False
        # absolute floor: parameters whose gradient is zero up to rounding (e.g. attention key biases)
        floor = 1e-5 * float(torch.stack(refs).norm()) if refs else 0.0
        names = {id(p): n for n, p in self._named}
        for p in self.params:
            ref = reference.pop(id(p), None)  # consumed: each gradient is freed once checked
            if ref is None:
                continue
            ref = ref.detach().float().reshape(-1)
            mine = rebuilt(p)
            # `not <=`: a NaN difference fails the check (`NaN > tol` would be False)
            if not float((mine - ref).norm()) <= self.verify_rtol * (float(ref.norm()) + float(mine.norm())) + floor:
                raise _not_adding_up(names.get(id(p), tuple(p.shape)))
        return True

    def _factored(self, kind: str, module: nn.Module, p: nn.Parameter, use: _Use) -> tuple | None:
        """The norm-without-instantiation plan of a singly used weight, or None (instantiate)."""
        x = use.a[0]
        if kind in ("linear", "conv1d") and p is module.weight:
            a, g = x, use.g
            if a.dtype != g.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                a, g = a.float(), g.float()
            if a.dim() >= 3:
                a = a.reshape(a.shape[0], -1, a.shape[-1])
                g = g.reshape(g.shape[0], -1, g.shape[-1])
            a, g = a.contiguous(), g.contiguous()
            # Linear: ∇W_i = g_iᵀ a_i  [p, d]; Conv1D: ∇W_i = a_iᵀ g_i  [d, p] (swap the factors)
            return ("factors", a, g) if kind == "linear" else ("factors", g, a)
        if kind == "embedding":
            ids = x.reshape(x.shape[0], -1)
            g = use.g.reshape(use.g.shape[0], -1, use.g.shape[-1])
            return ("embedding", ids, g, module.padding_idx)
        return None

    def write_grads(self, flat: Tensor, scale: float) -> None:
        """``p.grad <- flat_slice * scale`` (a view of ``flat`` for fp32 parameters)."""
        flat.mul_(scale)
        for p, off, n in zip(self.params, self._offsets, self._sizes):
            g = flat[off:off + n].view(p.shape)
            p.grad = g if p.dtype == torch.float32 else g.to(p.dtype)

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None


def _write(out: Tensor, p: Tensor, plan: tuple | None, coeffs: Tensor, std: float, seed: int | None, off: int,
           accumulate: bool = False, workspace: Tensor | None = None) -> None:
    """``out <- [out +] Σ_i coeffs_i ∇_i + std · ξ`` for one parameter (``out`` is its slice of the flat buffer; not
    read unless ``accumulate``; ``plan`` None: no example reached it, the sum is 0). ``workspace``: scratch for the
    scaled factor (:func:`_workspace_numel` elements), shared by all the parameters of a step."""
    if plan is not None and plan[0] != "embedding":
        src = plan[1] if plan[0] == "dense" else (plan[1], plan[2])
        clip_and_noise_(out, src, coeffs, std, seed, off, accumulate=accumulate, workspace=workspace)
        return
    if not accumulate:  # the noise (or 0) straight into `out`, no temporary; the clipped sum is added to it
        if std:
            noise_(out, std, seed, off, overwrite=True)
        else:
            out.zero_()
    if plan is not None:  # embedding: scatter c_i g_{i,t} into the rows of its tokens (padding row excluded)
        _, ids, g, pad = plan
        g = scale_examples(g, coeffs, workspace)  # a new tensor or the workspace: never the stored `g`
        if pad is not None:
            g.masked_fill_((ids == pad).unsqueeze(-1), 0.0)
        out.view(p.shape).index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
    if std and accumulate:
        noise_(out, std, seed, off, overwrite=False)


def _workspace_numel(plans: Any) -> int:
    """Elements of the scratch that :func:`_write` needs for the largest scaled factor among ``plans``: what
    :func:`~custom_kernels.clip_noise.clip_and_noise_` scales for a linear layer, or the output gradient of an
    embedding."""
    most = 0
    for plan in plans:
        if plan is None or plan[0] == "dense":
            continue
        most = max(most, factor_workspace_numel(plan[1], plan[2]) if plan[0] == "factors" else plan[2].numel())
    return most


def _drop_rows(plan: tuple, bad: Tensor) -> tuple:
    """``plan`` with the rows of the examples in ``bad`` (bool ``[B]``) set to exactly 0: new tensors, the stored
    ones are autograd's (ghost mode's second backward still needs them)."""

    def zero(x: Tensor) -> Tensor:
        return x.masked_fill(bad.view(-1, *([1] * (x.dim() - 1))), 0)

    if plan[0] == "factors":
        return ("factors", zero(plan[1]), zero(plan[2]))
    if plan[0] == "dense":
        return ("dense", zero(plan[1]))
    return ("embedding", plan[1], zero(plan[2]), plan[3])


def _not_adding_up(name: Any) -> RuntimeError:
    return RuntimeError(
        f"DP-SGD: the per-example gradients of parameter {name!r} do not add up to its gradient: it is used outside "
        "the module that owns it (e.g. a functional call on `module.weight`, or a module whose input is not "
        "batch-first, or reentrant activation checkpointing, whose recomputed forward the hooks do not see). "
        "Per-example clipping would be wrong for it; call the owning module instead, freeze the parameter, or use "
        "non-reentrant checkpointing (`gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
        "False})`)."
    )


class _GhostStep:
    """Ghost mode, one step, two backward passes whose output-gradient hooks do all the work.

    ``"norms"`` phase (first backward, of ``Σ_i ℓ_i``): per-example squared norms streamed from the output gradients
    as backward produces them; each output gradient is dropped right after, so they never pile up. The stored inputs
    ``a`` (the tensors autograd saved for its own backward, not copies) are kept for the second pass. Parameters used
    once take the norm-without-instantiation path (Gram / explicit for linear layers, token Gram for embeddings) or,
    for small ones (biases, norms), an instantiated ``[B, *shape]`` gradient; parameters with several uses (tied)
    accumulate instantiated per-example gradients, normed in :meth:`finish`. With ``verify``, ``Σ_i ∇_i`` is also
    rebuilt per parameter (parameter-sized buffers) and checked against autograd's ``.grad`` (:meth:`verify`).

    ``"sum"`` phase (second backward, of ``Σ_i c_i ℓ_i``, stopped at the hooked outputs): each output gradient
    already carries ``c_i``; its use's ``Σ_i c_i ∇_i`` is added at once into the parameter's own fp32
    buffer (book-keeping from ``(a, g)``; a tied parameter adds one such sum per use), then ``a`` and ``g`` are freed.
    Autograd's parameter gradients are never computed, so a parameter used outside its module adds nothing there.

    An example whose squared norm is not finite gets ``c_i = 0`` and its rows are zeroed before they enter the sum
    (``0 · NaN = NaN``), only on steps that have one.
    """

    def __init__(self, mech: BookKeepingDPSGD, batch: int, device: torch.device, verify: bool) -> None:
        self.mech = mech
        self.batch = batch
        self.phase = "norms"
        self.sq = torch.zeros(batch, dtype=torch.float32, device=device)
        self.device = device
        self.verified = False
        # set by start_sum: the clip factors, the rows to zero (None when all norms are finite), the output buffer
        self.coeffs: Tensor | None = None
        self.bad: Tensor | None = None
        self.nonfinite = 0
        self.parts: dict[int, Tensor] = {}
        self.ones: Tensor | None = None
        # parameters with several uses this step (a module called twice, or one parameter in several modules)
        count: dict[int, int] = {}
        for _, mod, _ in mech._modules:
            n = len(mech._uses[id(mod)])
            for p in mod.parameters(recurse=False):
                if p.requires_grad:
                    count[id(p)] = count.get(id(p), 0) + n
        self.multi = {k for k, n in count.items() if n > 1}
        self.dense: dict[int, Tensor] = {}
        self.sums: dict[int, Tensor] | None = {} if verify else None
        # inputs shared by several singly used linear layers (q, k, v): their Gram matrix is computed once
        self.shared_left: dict[tuple, int] = {}
        for _, mod, kind in mech._modules:
            if kind in ("linear", "conv1d") and mod.weight.requires_grad and id(mod.weight) not in self.multi:
                for use in mech._uses[id(mod)]:
                    x = use.a[0] if use.a else None
                    if isinstance(x, Tensor) and x.dim() >= 3:
                        key = _key(x)
                        self.shared_left[key] = self.shared_left.get(key, 0) + 1
        self.grams: dict[tuple, tuple[Tensor, ...]] = {}

    def _input_gram(self, x: Tensor) -> tuple[Tensor, ...] | None:
        key = _key(x)
        if self.shared_left.get(key, 0) < 2 and key not in self.grams:
            return None
        if key not in self.grams:
            self.grams[key] = gram(x.reshape(x.shape[0], -1, x.shape[-1]))
        return self.grams[key]

    def _release_input(self, x: Tensor) -> None:
        key = _key(x)
        if key in self.shared_left:
            self.shared_left[key] -= 1
            if self.shared_left[key] <= 0:
                self.grams.pop(key, None)

    def on_output_grad(self, module: nn.Module, use: _Use, g: Tensor) -> None:
        mech = self.mech
        name, kind = mech._info[id(module)]
        if use.g is not None:
            raise RuntimeError(f"DP-SGD ghost clipping: the output of {name or '<root>'} received two gradients")
        use.g = g
        mech._check(name, module, use, self.batch)
        if self.phase == "sum":
            self._add_sum(module, kind, use)
            return
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(p) in self.multi:
                gs = mech._dense(kind, module, use, p)
                self.dense[id(p)] = gs if id(p) not in self.dense else self.dense[id(p)].add_(gs)
                continue
            plan = mech._factored(kind, module, p, use)
            if plan is None:
                plan = ("dense", mech._dense(kind, module, use, p).reshape(self.batch, -1).contiguous())
                self.sq += plan[1].square().sum(1)
            elif plan[0] == "factors":
                shared = self._input_gram(use.a[0])
                first_is_input = kind == "linear"
                self.sq += factor_sq_norms(plan[1], plan[2], a_gram=shared if first_is_input else None,
                                           g_gram=None if first_is_input else shared)
            else:
                self.sq += _embedding_sq_norms(plan[1], plan[2], plan[3])
            if self.sums is not None:
                self.sums[id(p)] = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
                _write(self.sums[id(p)], p, plan, torch.ones(self.batch, device=self.device), 0.0, None, 0)
        if kind in ("linear", "conv1d") and use.a and isinstance(use.a[0], Tensor):
            self._release_input(use.a[0])
        mech._opacus_cache.pop(id(use), None)
        use.g = None  # the input `a` and the output's edge stay for the second pass

    def finish(self) -> Tensor:
        """The per-example squared norms over all parameters (after the first backward)."""
        for key, total in self.dense.items():
            flat = total.reshape(self.batch, -1)
            self.sq += flat.square().sum(1)
            if self.sums is not None:
                self.sums[key] = flat.sum(0)
        self.dense.clear()
        self.grams.clear()
        self.shared_left.clear()
        return self.sq

    def verify(self, reference: dict[int, Tensor]) -> bool:
        """``Σ_i ∇_i`` rebuilt from the hooks must equal autograd's gradient (see ``BookKeepingDPSGD._verify``).

        Sets and returns :attr:`verified`: False without a check when a norm or the reference is not finite."""
        assert self.sums is not None
        sums = self.sums
        self.sums = None
        if bool(torch.isfinite(self.sq).all()):  # else: not checkable this step (verified stays False)
            self.verified = self.mech._check_sums(
                lambda p: sums.get(id(p), torch.zeros(p.numel(), device=self.device)), reference
            )
        return self.verified

    def start_sum(self) -> None:
        """Clip factors from the norms; the hooks of the next backward add ``Σ_i c_i ∇_i`` into per-parameter
        buffers (:attr:`parts`, allocated on first use), which :meth:`assemble` copies into the flat buffer."""
        self.coeffs = clip_coefficients(self.sq, self.mech.clip)
        bad = ~torch.isfinite(self.sq)
        self.nonfinite = int(bad.sum())
        self.bad = bad if self.nonfinite else None
        # one buffer per parameter, allocated when its first output gradient arrives (as autograd's `.grad` would
        # be): a flat buffer allocated up front would sit next to every activation at the start of the second pass
        self.parts: dict[int, Tensor] = {}
        self.ones = torch.ones(self.batch, dtype=torch.float32, device=self.device)
        self.phase = "sum"

    def assemble(self, device: torch.device, out: Tensor | None = None) -> Tensor:
        """The flat fp32 buffer of ``Σ_i c_i ∇_i`` over all parameters (after the second pass), added into ``out``
        (the earlier chunks' sums) when given; each per-parameter part is freed as soon as it is copied."""
        mech = self.mech
        flat = torch.zeros(mech.numel, dtype=torch.float32, device=device) if out is None else out
        for p, off, n in zip(mech.params, mech._offsets, mech._sizes):
            part = self.parts.pop(id(p), None)
            if part is not None:
                flat[off:off + n].add_(part)
            del part
        return flat

    def _add_sum(self, module: nn.Module, kind: str, use: _Use) -> None:
        """Sum phase: ``parts[p] += Σ_i ∇_i`` of this use, from ``(a, g)`` where ``g`` already carries ``c_i``."""
        mech = self.mech
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            plan = mech._factored(kind, module, p, use)
            if plan is None:  # biases, norms, Opacus layers: instantiated (small), then summed
                plan = ("dense", mech._dense(kind, module, use, p).reshape(self.batch, -1).contiguous())
            if self.bad is not None:
                plan = _drop_rows(plan, self.bad)
            out = self.parts.get(id(p))
            if out is None:
                out = self.parts[id(p)] = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
            _write(out, p, plan, self.ones, 0.0, None, 0, accumulate=True)  # no noise here: the offset is unused
        mech._opacus_cache.pop(id(use), None)
        use.a, use.g, use.edge = (), None, None


class _SharedInputGrams:
    """Per-example Gram matrices of the factors that several layers share (the one input of an attention block's
    query, key and value projections; the one output gradient of embeddings whose outputs are added), computed once
    per step; other factors are not kept."""

    def __init__(self, plans: list[tuple | None]) -> None:
        counts: dict[tuple, int] = {}
        for plan in plans:
            if plan is not None and plan[0] == "embedding":  # always the Gram form
                counts[_key(plan[2])] = counts.get(_key(plan[2]), 0) + 1
            if plan is None or plan[0] != "factors" or plan[1].dim() != 3:
                continue
            t, first, second = plan[1].shape[1], plan[1].shape[2], plan[2].shape[2]
            if not uses_gram(t, first, second):
                continue
            for x in plan[1:]:
                counts[_key(x)] = counts.get(_key(x), 0) + 1
        self._shared = {k for k, n in counts.items() if n > 1}
        self._grams: dict[tuple, tuple[Tensor, ...]] = {}

    def get(self, x: Tensor) -> tuple[Tensor, ...] | None:
        key = _key(x)
        if key not in self._shared:
            return None
        if key not in self._grams:
            self._grams[key] = gram(x)
        return self._grams[key]


def _key(x: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)


def _embedding_sq_norms(ids: Tensor, g: Tensor, padding_idx: int | None, g_gram: tuple | None = None) -> Tensor:
    """``Σ_{t,s} 1[x_t = x_s ≠ pad] ⟨g_t, g_s⟩`` per example (fp32 ``[B]``), O(B T²) memory. ``g_gram``:
    :func:`~custom_kernels.clip_noise.gram` of ``g`` when the caller has it (embeddings whose outputs are added,
    e.g. BERT's word, position and token-type embeddings, receive one output gradient)."""
    match = ids.unsqueeze(2) == ids.unsqueeze(1)
    if padding_idx is not None:
        keep = ids != padding_idx
        match = match & keep.unsqueeze(2) & keep.unsqueeze(1)
    return gram_dot(gram(g) if g_gram is None else g_gram, symmetric_panels(match.float()))


