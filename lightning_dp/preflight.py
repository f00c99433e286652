"""Pre-flight check: everything that would make a DP strategy refuse a module, or break its guarantee, found before
any training step and reported all at once.

``validate(model, strategy="dpsgd")`` lists the problems (:class:`Problem`); ``fix(model)`` replaces the layers
that have a standard private substitute (BatchNorm -> GroupNorm, InstanceNorm without running statistics).
``DPSGDStrategy`` and ``DPZeroStrategy`` run the same checks at setup, the module's before Lightning builds the
optimizers and the optimizers' right after, each time raising ONE :class:`~lightning_dp.errors.ValidationError`
that lists every problem with its fix. The checks are deterministic functions of the module and its optimizers (no
data, no collective), so every rank raises the same error.

A static check cannot see everything; what it misses is caught by the strategies at run time:

* a trainable parameter used outside the module that owns it: only the obvious cases are found here (a tensor
  operation or an arithmetic operator applied to ``self.<submodule>.<parameter>`` in a ``forward`` or
  ``training_step``); ``DPSGDStrategy`` compares ``Σ_i ∇_i`` rebuilt from its hooks with autograd's gradient on the
  first step and refuses any other;
* a buffer written by a custom ``forward``: every strategy compares all buffers before and after the first step;
* an optimizer that evaluates the closure more than once (SAM-style, other than ``torch.optim.LBFGS``): the
  strategies count the evaluations at every step.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import LBFGS, SGD, Optimizer

from lightning_dp.errors import UnsupportedLayerError, ValidationError
from lightning_dp.mechanisms.buffers import data_dependent_buffer_modules
from lightning_dp.mechanisms.checkpointing import reentrant_checkpointing
from lightning_dp.mechanisms.dpsgd import _BATCH_MIXING, _kind

__all__ = ["KINDS", "Problem", "ValidationError", "fix", "module_problems", "optimizer_problems",
           "raise_if_problems", "validate"]

KINDS = (
    "manual_optimization",  # automatic_optimization = False: training_step would step the optimizer itself
    "unsupported_layer",  # DP-SGD: a trainable parameter whose per-example gradients cannot be computed
    "batch_mixing",  # BatchNorm-like layers: one example's output depends on the others of its batch
    "data_dependent_buffer",  # running statistics of the training data, saved un-noised with the model
    "parameter_outside_module",  # DP-SGD: a trainable parameter used where its module's hooks cannot see it
    "no_trainable_parameters",  # nothing requires grad: nothing to train
    "optimizer",  # an optimizer the strategy cannot step privately (DPZero's SGD rule, LBFGS, their number)
    "optimizer_foreign_parameters",  # an optimizer moves trainable parameters that are not in the module
    "non_contiguous_parameter",  # DPZero: in-place seeded perturbation needs contiguous parameters
    "low_precision_parameter",  # DPZero: fp16/bf16 trainable parameters drift under ±λz (a warning)
    "reentrant_checkpointing",  # DP-SGD: reentrant activation checkpointing hides the recomputed forward
)

_METHODS = {"dpsgd": "DPSGDStrategy", "dpzero": "DPZeroStrategy", "federated": "DPLoRAFederatedStrategy"}
_ROOT = "<root>"


@dataclass(frozen=True)
class Problem:
    """One reason why a strategy would refuse a module, or fail to protect it.

    Args:
        kind: what is wrong, one of :data:`KINDS`.
        where: the qualified name of the module or parameter concerned (``"<root>"`` for the module itself,
            ``"optimizer 0"`` for the first optimizer).
        message: what is wrong and why it matters, as a sentence that names ``where``.
        fix: one sentence saying what to change.
        severity: ``"error"`` (the strategy refuses to train) or ``"warning"`` (it trains, and warns).

    Raises:
        ValueError: for a ``kind`` not in :data:`KINDS` or another ``severity``.
    """

    kind: str
    where: str
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}; one of {KINDS}")
        if self.severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', got {self.severity!r}")

    def __str__(self) -> str:
        return f"[{self.severity}: {self.kind}] {self.message} Fix: {self.fix}"


def raise_if_problems(problems: Iterable[Problem], name: str) -> None:
    """Warn about each warning-level problem (``rank_zero_warn``) and raise ONE error listing every error-level one,
    each with its fix.

    Args:
        problems: from :func:`validate`, :func:`module_problems` or :func:`optimizer_problems`.
        name: who refuses, the start of the message (e.g. ``"DPSGDStrategy"``).

    Raises:
        ValidationError: if a problem has severity ``"error"`` (:attr:`ValidationError.problems` holds them).
    """
    problems = list(problems)
    for p in problems:
        if p.severity == "warning":
            rank_zero_warn(f"{name}: {p}")
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    count = "1 problem" if len(errors) == 1 else f"{len(errors)} problems"
    lines = "\n".join(f"  {i}. {p.message} Fix: {p.fix}" for i, p in enumerate(errors, 1))
    raise ValidationError(f"{name} cannot train this module privately ({count}, all listed):\n{lines}", errors)


# ---------------------------------------------------------------------------------------------------------- validate
def validate(
    module: nn.Module,
    strategy: Any = "dpsgd",
    optimizers: Sequence[Optimizer] | None = None,
) -> list[Problem]:
    """The problems that would make ``strategy`` refuse ``module`` or break its privacy guarantee, without training.

    ``validate(model, "dpsgd")`` checks the module (:func:`module_problems`) and its optimizers
    (:func:`optimizer_problems`). The optimizers are ``optimizers`` if given, else built by calling
    ``module.configure_optimizers()``; if that fails (it may need ``self.trainer``): optimizer not checked, and
    the failure is not reported as a problem (the strategy checks the optimizers it builds at setup). Without an
    optimizer, DPZero's rules on trainable parameters (contiguous, fp32) are checked on the module's trainable
    parameters instead.

    Args:
        module: the model, usually a LightningModule (any ``nn.Module`` works).
        strategy: a strategy instance, a strategy class, or ``"dpsgd"`` | ``"dpzero"`` | ``"federated"``. With a
            class or a name, the strategy's defaults are assumed (e.g. DPZero's ``dropout="off"``).
        optimizers: the optimizers to check instead of those ``configure_optimizers`` builds.

    Returns:
        The problems, errors and warnings (see :attr:`Problem.severity`), empty when the module is ready.

    Raises:
        ValueError: for an unknown strategy name.
        TypeError: for a strategy that is not one of the library's.
    """
    problems = module_problems(module, strategy)
    if optimizers is None:
        optimizers = _built_optimizers(module)
    if optimizers is not None:
        return problems + optimizer_problems(module, optimizers, strategy)
    if _resolve(strategy)[0] == "dpzero":
        problems += _zo_parameter_problems([(n, p) for n, p in module.named_parameters() if p.requires_grad])
    return problems


def module_problems(module: nn.Module, strategy: Any = "dpsgd") -> list[Problem]:
    """The module's problems for ``strategy`` (everything :func:`validate` checks except the optimizers): what the
    strategies check at setup, before the optimizers are built.

    Args:
        module: the model.
        strategy: as in :func:`validate`.

    Raises:
        ValueError: for an unknown strategy name.
        TypeError: for a strategy that is not one of the library's.
    """
    method, dropout = _resolve(strategy)
    problems = []
    if getattr(module, "automatic_optimization", True) is False:
        problems.append(Problem(
            "manual_optimization", _ROOT,
            f"{type(module).__name__} uses manual optimization (`automatic_optimization = False`): `training_step` "
            f"would step the optimizer itself, outside the privacy mechanism, and {_METHODS[method]} owns the "
            "optimization step.",
            "Use automatic optimization and return per-example losses from `training_step`.",
        ))
    if method == "dpsgd":
        problems += _batch_mixing(module, "DP-SGD runs the forward in train mode, frozen or not", lambda m: True)
        problems += _unsupported_layers(module)
        problems += _buffers(module, "DP-SGD runs the forward in train mode")
        problems += _functional_uses(module)
        problems += [Problem(
            "reentrant_checkpointing", name,
            f"{name} runs gradient checkpointing in reentrant mode, whose recomputed forward the per-example hooks "
            "cannot see.",
            "Use non-reentrant checkpointing: `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})`.",
        ) for name in reentrant_checkpointing(module)]
        if not any(p.requires_grad for p in module.parameters()):
            problems.append(_nothing_to_train("the module"))
    elif method == "dpzero":
        if dropout == "same":
            problems += _batch_mixing(module, "dropout='same' runs the probes in train mode", lambda m: True)
            problems += _buffers(module, "dropout='same' runs the probes in train mode")
        else:  # eval-mode probes: only layers without running statistics normalize with the batch's
            problems += _batch_mixing(module, "it has no running statistics, so even the eval-mode probes "
                                      "normalize with the batch's", lambda m: not m.track_running_stats)
    else:
        problems += _buffers(module, "each client's statistics would be neither federated nor noised")
    return problems


def optimizer_problems(module: nn.Module, optimizers: Sequence[Optimizer], strategy: Any = "dpsgd") -> list[Problem]:
    """The optimizers' problems for ``strategy``: what the strategies check at setup once the optimizers are built.

    DPSGD: an optimizer that holds trainable parameters outside ``module``, LBFGS (it evaluates the closure several
    times: several releases of one batch). DPZero: exactly one optimizer, ``torch.optim.SGD`` without
    momentum/nesterov, holding at least one trainable parameter, all contiguous, fp32 (a warning otherwise).
    Federated: trainable parameters outside ``module``.

    Args:
        module: the model the optimizers belong to.
        optimizers: its optimizers.
        strategy: as in :func:`validate`.

    Raises:
        ValueError: for an unknown strategy name.
        TypeError: for a strategy that is not one of the library's.
    """
    method, _ = _resolve(strategy)
    names = {}
    for n, p in module.named_parameters():
        names.setdefault(id(p), n)
    problems = []
    if method in ("dpsgd", "federated"):
        for i, optimizer in enumerate(optimizers):
            foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
                       if p.requires_grad and id(p) not in names]
            if foreign:
                problems.append(Problem(
                    "optimizer_foreign_parameters", f"optimizer {i}",
                    f"optimizer {i} ({type(optimizer).__name__}) holds trainable parameters that are not in the "
                    f"module (shapes {foreign}): {_METHODS[method]} privatizes the module's parameters and cannot "
                    "bound the contribution of an example to the others.",
                    "Register those parameters on the module (as submodules or `nn.Parameter` attributes).",
                ))
    if method == "dpsgd":
        for i, optimizer in enumerate(optimizers):
            if isinstance(optimizer, LBFGS):
                problems.append(Problem(
                    "optimizer", f"optimizer {i}",
                    f"optimizer {i} (LBFGS) evaluates the training closure more than once in one step: each "
                    "evaluation releases another private gradient of the same batch, which the accountant would "
                    "not see.",
                    "Use an optimizer that evaluates the closure once (SGD, Adam, AdamW, ...).",
                ))
    if method == "dpzero":
        if len(optimizers) != 1:
            problems.append(Problem(
                "optimizer", "optimizers",
                f"DPZeroStrategy needs exactly one optimizer, got {len(optimizers)}.",
                "Return one `torch.optim.SGD` from `configure_optimizers` (param groups for different learning "
                "rates).",
            ))
        trainable, seen = [], set()
        for i, optimizer in enumerate(optimizers):
            problems += _zo_optimizer_problems(i, optimizer)
            for g, group in enumerate(optimizer.param_groups):
                for k, p in enumerate(group["params"]):
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        trainable.append((names.get(id(p), f"optimizer {i}, group {g}, parameter {k}"), p))
        if optimizers and not trainable:
            problems.append(_nothing_to_train("the optimizer"))
        problems += _zo_parameter_problems(trainable)
    return problems


def _resolve(strategy: Any) -> tuple[str, str]:
    """``(method, dropout)`` of a strategy instance, class or name."""
    if isinstance(strategy, str):
        if strategy not in _METHODS:
            raise ValueError(f"unknown strategy {strategy!r}: one of {tuple(_METHODS)}, a strategy class or instance")
        return strategy, "off"
    from lightning_dp.strategies import DPLoRAFederatedStrategy, DPSGDStrategy, DPZeroStrategy

    cls = strategy if isinstance(strategy, type) else type(strategy)
    for method, base in (("dpsgd", DPSGDStrategy), ("dpzero", DPZeroStrategy), ("federated", DPLoRAFederatedStrategy)):
        if issubclass(cls, base):
            dropout = "off" if isinstance(strategy, type) else getattr(strategy, "dropout", "off")
            return method, dropout
    raise TypeError(f"cannot validate for {cls.__name__}: pass a lightning_dp strategy, its class, or one of "
                    f"{tuple(_METHODS)}")


def _display(name: str) -> str:
    return name or _ROOT


def _nothing_to_train(what: str) -> Problem:
    return Problem(
        "no_trainable_parameters", _ROOT,
        f"{what} holds no parameter that requires grad: there is nothing to train.",
        "Unfreeze the parameters to train (`requires_grad_(True)`) and pass them to the optimizer.",
    )


def _batch_mixing(module: nn.Module, why: str, applies: Any) -> list[Problem]:
    found = []
    for name, mod in module.named_modules():
        if isinstance(mod, _BATCH_MIXING) and applies(mod):
            found.append(Problem(
                "batch_mixing", _display(name),
                f"{_display(name)} ({type(mod).__name__}) mixes the examples of a batch: it normalizes each example "
                f"with statistics of the whole batch ({why}), so one example's loss depends on the others and the "
                "per-example bound of the privacy guarantee does not hold.",
                "Replace it with GroupNorm: `model = lightning_dp.fix(model)`.",
            ))
    return found


def _unsupported_layers(module: nn.Module) -> list[Problem]:
    """DP-SGD: modules with own trainable parameters that the mechanism has no per-example rule for (the predicate
    is the mechanism's own, :func:`lightning_dp.mechanisms.dpsgd._kind`)."""
    found = []
    for name, mod in module.named_modules():
        own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own or isinstance(mod, _BATCH_MIXING):  # batch-mixing layers are reported by _batch_mixing
            continue
        try:
            _kind(mod)
        except UnsupportedLayerError as err:
            reason = "" if str(err) == type(mod).__name__ else f" ({err})"
            found.append(Problem(
                "unsupported_layer", _display(name),
                f"{_display(name)} ({type(mod).__name__}) holds trainable parameters ({', '.join(own)}) whose "
                f"per-example gradients DP-SGD cannot compute{reason}.",
                f"Freeze them (`requires_grad_(False)`), move them into a layer type DPSGDStrategy supports, or "
                f"register an Opacus grad sampler for {type(mod).__name__} "
                "(`opacus.grad_sample.register_grad_sampler`).",
            ))
    return found


def _buffers(module: nn.Module, why: str) -> list[Problem]:
    return [
        Problem(
            "data_dependent_buffer", _display(name),
            f"{_display(name)} ({type(mod).__name__}) updates running statistics (buffers saved with the model) "
            f"from the training data, which no mechanism privatizes ({why}).",
            "Run `model = lightning_dp.fix(model)` (BatchNorm -> GroupNorm, InstanceNorm without running "
            "statistics) or build the layer with `track_running_stats=False`.",
        )
        for name, mod in data_dependent_buffer_modules(module, train_mode_only=False)
    ]


def _zo_optimizer_problems(i: int, optimizer: Optimizer) -> list[Problem]:
    """DPZero's rule: its update is plain zeroth-order SGD driven by the optimizer's lr, weight decay and schedule,
    so any other update rule would be silently ignored."""
    if type(optimizer) is not SGD:
        return [Problem(
            "optimizer", f"optimizer {i}",
            "DPZeroStrategy performs zeroth-order SGD and takes the learning rate, weight decay and schedule from "
            "your optimizer, which must therefore be `torch.optim.SGD` (got "
            f"{type(optimizer).__name__}, whose update rule would be silently ignored).",
            "Return `torch.optim.SGD(params, lr=...)` from `configure_optimizers`.",
        )]
    if any(group.get("momentum", 0) or group.get("nesterov", False) for group in optimizer.param_groups):
        return [Problem(
            "optimizer", f"optimizer {i}",
            "DPZeroStrategy performs plain zeroth-order SGD: `momentum`/`nesterov` of your SGD optimizer would be "
            "ignored.",
            "Use `torch.optim.SGD(params, lr=..., momentum=0)`.",
        )]
    return []


def _zo_parameter_problems(trainable: list[tuple[str, torch.Tensor]]) -> list[Problem]:
    """DPZero's rules on the parameters it perturbs in place: contiguous (error), fp32 (warning)."""
    problems = [
        Problem(
            "non_contiguous_parameter", name,
            f"trainable parameter {name!r} of shape {tuple(p.shape)} is not contiguous; DPZero's in-place seeded "
            "perturbation needs contiguous parameters.",
            "Store it contiguously before fitting (e.g. `param.data = param.data.contiguous()`).",
        )
        for name, p in trainable
        if not p.is_contiguous()
    ]
    for dtype in (torch.float16, torch.bfloat16):
        low = [name for name, p in trainable if p.dtype == dtype]
        if low:
            problems.append(Problem(
                "low_precision_parameter", low[0],
                f"{len(low)} trainable parameter(s) are {dtype} (e.g. {low[0]!r}): the ±λz perturbations are rounded "
                "at every step and θ drifts (~4% relative RMS after 100 steps in bf16).",
                "Keep trainable parameters in fp32 (e.g. fp32 LoRA adapters over a bf16 base, or "
                "precision='bf16-mixed').",
                severity="warning",
            ))
    return problems


def _built_optimizers(module: nn.Module) -> list[Optimizer] | None:
    """The optimizers ``module.configure_optimizers()`` builds without a Trainer, or None (not checked)."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.core.optimizer import _configure_optimizers
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not isinstance(module, LightningModule) or not is_overridden("configure_optimizers", module, LightningModule):
        return None
    try:
        optimizers, _, _ = _configure_optimizers(module.configure_optimizers())
    except Exception:  # e.g. it reads `self.trainer`: the strategy checks the optimizers it builds at setup
        return None
    return list(optimizers)


# ---------------------------------------------------------------------------------- parameters used outside a module
# Calls that compute with the tensors they are given (a parameter passed to one is used where its module's hooks
# cannot see it), and tensor methods that return a view or copy of the parameter on which such a call may act.
_COMPUTING_CALLS = frozenset({
    "linear", "bilinear", "embedding", "embedding_bag", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm",
    "prelu", "matmul", "mm", "bmm", "mv", "dot", "outer", "addmm", "baddbmm", "einsum", "tensordot", "mul", "add",
    "sub", "div", "cat", "stack", "where", "multi_head_attention_forward", "scaled_dot_product_attention",
})
_TENSOR_VIEWS = frozenset({
    "T", "mT", "H", "t", "transpose", "permute", "view", "reshape", "expand", "flatten", "unsqueeze", "squeeze",
    "contiguous", "to", "float", "half", "bfloat16", "type_as",
})


def _functional_uses(module: nn.Module) -> list[Problem]:
    """DP-SGD: trainable parameters that a ``forward`` (or the root's ``training_step``) hands to a tensor operation
    directly, as ``self.<submodule>.<parameter>``, instead of calling the module that owns them."""
    names = {}
    for n, p in module.named_parameters():
        names.setdefault(id(p), n)
    found, seen = [], set()
    for _, mod in module.named_modules():
        own = {id(p) for p in mod.parameters(recurse=False)}
        methods = ["forward"] + (["training_step"] if mod is module else [])
        for method in methods:
            fn = getattr(type(mod), method, None)
            for chain in _self_chains(fn) if inspect.isfunction(fn) else ():
                p = _follow(mod, chain)
                if not (isinstance(p, nn.Parameter) and p.requires_grad) or id(p) in own or id(p) in seen:
                    continue
                seen.add(id(p))
                name = names.get(id(p), _render(chain))
                found.append(Problem(
                    "parameter_outside_module", name,
                    f"trainable parameter {name!r} is used outside the module that owns it: "
                    f"`{type(mod).__qualname__}.{method}` applies a tensor operation to `{_render(chain)}`, a use "
                    "that DP-SGD's per-example hooks on its module never see, so its clipping would be wrong.",
                    "Call the owning module instead of using its parameter, or freeze the parameter.",
                ))
    return found


@functools.lru_cache(maxsize=None)
def _self_chains(fn: Any) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """The chains ``self.a[0].b`` (as ``(("attr", "a"), ("item", 0), ("attr", "b"))``) that ``fn`` passes to a call
    of :data:`_COMPUTING_CALLS` or uses as an operand of an arithmetic operator, possibly through
    :data:`_TENSOR_VIEWS` or slicing. Empty when the source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return ()
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or not func.args.args:
        return ()
    self_name = func.args.args[0].arg
    operands: list[ast.expr] = []
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and _callee(node.func) in _COMPUTING_CALLS:
            operands += [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, ast.BinOp):
            operands += [node.left, node.right]
    chains = []
    for expr in operands:
        while True:  # self.lin.weight.t(), self.lin.weight.T, self.lin.weight[:, :2] -> self.lin.weight
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in _TENSOR_VIEWS:
                expr = expr.func.value
            elif isinstance(expr, ast.Attribute) and expr.attr in _TENSOR_VIEWS:
                expr = expr.value
            elif isinstance(expr, ast.Subscript) and not isinstance(expr.slice, ast.Constant):
                expr = expr.value
            else:
                break
        chain = _chain(expr, self_name)
        if chain is not None:
            chains.append(chain)
    return tuple(dict.fromkeys(chains))


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _chain(expr: ast.expr, self_name: str) -> tuple[tuple[str, Any], ...] | None:
    steps: list[tuple[str, Any]] = []
    while True:
        if isinstance(expr, ast.Attribute):
            steps.append(("attr", expr.attr))
            expr = expr.value
        elif (isinstance(expr, ast.Subscript) and isinstance(expr.slice, ast.Constant)
              and isinstance(expr.slice.value, (int, str))):
            steps.append(("item", expr.slice.value))
            expr = expr.value
        elif isinstance(expr, ast.Name) and expr.id == self_name and steps:
            return tuple(reversed(steps))
        else:
            return None


def _follow(mod: nn.Module, chain: tuple[tuple[str, Any], ...]) -> Any:
    """The submodule or parameter a chain names, through registered submodules and parameters only (no property or
    ``__getattr__`` of the user's is ever run)."""
    obj: Any = mod
    for step, key in chain:
        if step == "item" and isinstance(obj, nn.Parameter):
            continue  # self.lin.weight[0]: an element of the parameter
        if step == "attr" and isinstance(obj, nn.Module) and key in obj._modules:
            obj = obj._modules[key]
        elif step == "attr" and isinstance(obj, nn.Module) and key in obj._parameters:
            obj = obj._parameters[key]
        elif step == "item" and isinstance(obj, (nn.Sequential, nn.ModuleList, nn.ParameterList)) and isinstance(
            key, int
        ) and -len(obj) <= key < len(obj):
            obj = obj[key]
        elif step == "item" and isinstance(obj, (nn.ModuleDict, nn.ParameterDict)) and key in obj:
            obj = obj[key]
        else:
            return None
    return obj


def _render(chain: tuple[tuple[str, Any], ...]) -> str:
    return "self" + "".join(f".{key}" if step == "attr" else f"[{key!r}]" for step, key in chain)


# --------------------------------------------------------------------------------------------------------------- fix
def fix(module: nn.Module) -> nn.Module:
    """Replace the layers that have a standard private substitute, in place where possible (like Opacus'
    ``ModuleValidator.fix``, which copies the model and skips frozen and parameter-free layers):

    * ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` -> ``GroupNorm(gcd(32, C), C)`` (Opacus' own fixer), with the affine
      weight and bias (and their ``requires_grad``) copied;
    * ``InstanceNorm1d/2d/3d(track_running_stats=True)`` -> the same layer without running statistics (and without
      the buffers, which the layer would otherwise keep updating), affine weight and bias copied.

    Each replacement keeps the old layer's device, dtype and train/eval mode, replaces every reference to the old
    layer (a layer registered twice stays shared) and is logged with ``rank_zero_info``. Subclasses and lazy
    variants of these layers are left as they are (:func:`validate` still reports them). GroupNorm normalizes over
    channels and positions of each example: a ``BatchNorm1d`` over ``[B, C]`` features becomes a layer over groups
    of ``C / gcd(32, C)`` features, which is a different model (as with Opacus).

    Args:
        module: the model.

    Returns:
        ``module``, changed in place; a new module only when ``module`` itself is one of these layers.
    """
    replaced: dict[int, nn.Module] = {}
    for name, mod in list(module.named_modules(remove_duplicate=False)):
        if id(mod) not in replaced:
            new = _private_substitute(mod)
            if new is None:
                continue
            replaced[id(mod)] = new
            rank_zero_info(f"lightning_dp.fix: replaced {_display(name)}: {mod} -> {new}")
        if not name:
            return replaced[id(mod)]
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, replaced[id(mod)])
    return module


def _private_substitute(mod: nn.Module) -> nn.Module | None:
    norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    if type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        from opacus.validators import ModuleValidator

        new = ModuleValidator.FIXERS[type(mod)](mod)  # GroupNorm(gcd(32, C), C, affine=mod.affine)
    elif type(mod) in norms and mod.track_running_stats:
        new = type(mod)(mod.num_features, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                        track_running_stats=False)
    else:
        return None
    tensors = [*mod.parameters(recurse=False), *(b for b in mod.buffers(recurse=False) if b.is_floating_point())]
    if tensors:
        new.to(device=tensors[0].device, dtype=tensors[0].dtype)
    with torch.no_grad():
        for attr in ("weight", "bias"):
            old, dst = getattr(mod, attr, None), getattr(new, attr, None)
            if isinstance(old, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.copy_(old)
                dst.requires_grad_(old.requires_grad)
    new.train(mod.training)
    return new
