"""Per-example losses for Hugging Face models: what ``training_step`` returns under a DP strategy.

Every DP strategy bounds the contribution of ONE example, so ``training_step`` must return one loss per example
(a Tensor ``[B]``). The ``loss`` that a Hugging Face model computes when it is given ``labels`` cannot be used: it
is a single batch-averaged scalar, and for token-level tasks it is averaged over all the target tokens of the
batch, ``Σ_i Σ_t ℓ_it / Σ_j n_j``. The weight of example i in that mean is ``n_i / Σ_j n_j``: it depends on the
*other* examples' token counts, so neither "clip the batch loss" nor "multiply it by B" bounds the influence of one
example, and the sensitivity the noise is calibrated for would be wrong. The helpers below average (or sum) each
sequence over ITS OWN target tokens, which makes the loss of example i a function of example i alone.

Port a Hugging Face LightningModule by returning ``from_hf_output(out, batch, model=self.model)`` from
``training_step`` (and choosing the strategy); or call the explicit function of the task:

- :func:`classification`: ``*ForSequenceClassification`` (single-label, multi-label, regression);
- :func:`causal_lm`: ``*ForCausalLM`` / ``*LMHeadModel`` (labels shifted by one inside);
- :func:`token_classification`: ``*ForTokenClassification`` (also the masked-LM loss: no shift);
- :func:`seq2seq`: encoder-decoder ``*ForConditionalGeneration`` / ``*ForSeq2SeqLM`` (T5, BART).

All compute in float32 (float64 logits stay float64), also for bf16/fp16 logits, and return a Tensor ``[B]``
(``[0]`` for an empty batch). Positions whose label is ``ignore_index`` (-100, as in Hugging Face) are no
targets; a sequence without any target has loss 0.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dp.mechanisms.per_sample import PerSampleLossError

__all__ = ["PROBLEM_TYPES", "TASKS", "causal_lm", "classification", "from_hf_output", "seq2seq", "token_classification"]

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
TASKS = ("classification", "causal_lm", "token_classification", "seq2seq")
_REDUCTIONS = ("mean", "sum")

# Class-name suffixes of Hugging Face heads whose loss is unambiguous, in the order they are tried.
_MODEL_SUFFIXES = (
    ("ForSequenceClassification", "classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForSeq2SeqLM", "seq2seq"),
    ("ForConditionalGeneration", "seq2seq"),  # encoder-decoder only: checked with `config.is_encoder_decoder`
)
# Parts of the names of Hugging Face output classes (``transformers.modeling_outputs``) that fix the task.
_OUTPUT_NAMES = (
    ("Seq2SeqLMOutput", "seq2seq"),
    ("CausalLMOutput", "causal_lm"),
    ("TokenClassifierOutput", "token_classification"),
    ("SequenceClassifierOutput", "classification"),
)


def classification(
    logits: Tensor,
    labels: Tensor,
    *,
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] | None = None,
) -> Tensor:
    """Per-example loss of a sequence classifier, as ``*ForSequenceClassification`` defines it, without the mean
    over the batch.

    - ``"single_label_classification"``: cross-entropy of ``logits [B, C]`` and integer ``labels [B]``
      (a label equal to -100 is no target: loss 0, as in Hugging Face);
    - ``"multi_label_classification"``: binary cross-entropy with logits, ``logits [B, C]`` and ``labels [B, C]``
      (0/1 or soft targets), averaged over the C labels of each example;
    - ``"regression"``: squared error of ``logits [B]`` / ``[B, 1]`` and ``labels [B]`` / ``[B, 1]``, or of
      ``logits [B, k]`` and ``labels [B, k]`` averaged over the k outputs of each example.

    Args:
        logits: the model's ``[B, C]`` (or, for regression with one output, ``[B]``) logits.
        labels: ``[B]`` class indices, ``[B, C]`` multi-label targets or regression targets.
        problem_type: one of ``PROBLEM_TYPES``, or ``None`` to infer it as Hugging Face does: one output
            (``num_labels == 1``) is regression; otherwise integer labels are single-label and floating-point (or
            bool) labels multi-label. Pass the model's ``config.problem_type`` when it is set.

    Returns:
        The ``[B]`` per-example losses in float32 (float64 for float64 logits).

    Raises:
        PerSampleLossError: if ``logits`` or ``labels`` have no batch dimension, or disagree on the batch size.
        ValueError: for an unknown ``problem_type``, non-floating-point logits, or labels whose shape, dtype or
            values do not fit the problem type.
    """
    _check_floating("logits", logits)
    _check_batch(logits, labels, logits_dims=(1, 2), labels_dims=(1, 2), what="classification")
    num_labels = logits.shape[1] if logits.ndim == 2 else 1
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.is_floating_point() or labels.dtype == torch.bool:
            problem_type = "multi_label_classification"
        else:
            problem_type = "single_label_classification"
    elif problem_type not in PROBLEM_TYPES:
        raise ValueError(f"`problem_type` must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")
    labels = labels.to(logits.device)
    dtype = _compute_dtype(logits)

    if problem_type == "single_label_classification":
        if logits.ndim != 2 or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                "single-label classification takes logits [B, C] and integer class labels [B]; got logits "
                f"{_shape(logits)} and labels {_shape(labels)} of dtype {labels.dtype}. Multi-label targets [B, C] "
                "need problem_type='multi_label_classification'."
            )
        _check_label_range(labels, num_labels, ignore_index=-100, what="class")
        if logits.shape[0] == 0:
            return logits.new_zeros(0, dtype=dtype)
        return F.cross_entropy(logits.to(dtype), labels.long(), reduction="none")

    if problem_type == "multi_label_classification":
        if logits.ndim != 2 or labels.shape != logits.shape:
            raise ValueError(
                "multi-label classification takes logits [B, C] and targets [B, C] of the same shape; got logits "
                f"{_shape(logits)} and labels {_shape(labels)}. Integer class labels [B] need "
                "problem_type='single_label_classification'."
            )
        if logits.shape[0] == 0:
            return logits.new_zeros(0, dtype=dtype)
        per_label = F.binary_cross_entropy_with_logits(logits.to(dtype), labels.to(dtype), reduction="none")
        return per_label.mean(1)

    # regression
    if labels.dtype == torch.bool:
        raise ValueError("regression targets must be numbers, got bool labels")
    if num_labels == 1:
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ValueError(f"regression with one output takes labels [B] or [B, 1], got {_shape(labels)}")
        pred, target = logits.reshape(-1), labels.reshape(-1)
    else:
        if labels.shape != logits.shape:
            raise ValueError(
                f"regression with {num_labels} outputs takes labels of the logits' shape {_shape(logits)}, got "
                f"{_shape(labels)}"
            )
        pred, target = logits, labels
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=dtype)
    squared = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none")
    return squared if squared.ndim == 1 else squared.mean(1)


def causal_lm(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Per-sequence loss of a causal language model: ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the shift is
    done here, as Hugging Face's ``*ForCausalLM`` does it inside the model), token cross-entropy, and each sequence
    averaged over its own target tokens (``reduction="mean"``) or summed (``"sum"``).

    Pass the labels unshifted (usually ``input_ids`` with padding and prompt positions set to ``ignore_index``).

    Args:
        logits: ``[B, T, V]`` logits.
        labels: ``[B, T]`` token ids, ``ignore_index`` where there is no target.
        ignore_index: the label of positions that are no targets.
        reduction: ``"mean"`` (over the sequence's own target tokens; 0 for a sequence without any) or ``"sum"``.

    Returns:
        The ``[B]`` per-sequence losses in float32 (float64 for float64 logits).

    Raises:
        PerSampleLossError: if ``logits`` is not ``[B, T, V]``, ``labels`` not ``[B, T]``, or their batch sizes
            differ.
        ValueError: for an unknown ``reduction``, non-floating-point logits, non-integer labels, mismatched
            sequence lengths, or a label outside ``[0, V)`` that is not ``ignore_index``.
    """
    _check_sequence(logits, labels, reduction, what="causal_lm")
    return _token_losses(logits[:, :-1], labels[:, 1:], ignore_index, reduction)


def token_classification(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Per-sequence loss of a token classifier (``*ForTokenClassification``; the masked-LM loss is the same
    computation): token cross-entropy of ``logits[:, t]`` and ``labels[:, t]`` (no shift), each sequence averaged
    over its own labelled tokens (``reduction="mean"``) or summed (``"sum"``).

    Args:
        logits: ``[B, T, C]`` logits.
        labels: ``[B, T]`` class ids, ``ignore_index`` where there is no label (padding, sub-word continuations).
        ignore_index: the label of positions that are no targets.
        reduction: ``"mean"`` (over the sequence's own labelled tokens; 0 for a sequence without any) or ``"sum"``.

    Returns:
        The ``[B]`` per-sequence losses in float32 (float64 for float64 logits).

    Raises:
        PerSampleLossError: if ``logits`` is not ``[B, T, C]``, ``labels`` not ``[B, T]``, or their batch sizes
            differ.
        ValueError: for an unknown ``reduction``, non-floating-point logits, non-integer labels, mismatched
            sequence lengths, or a label outside ``[0, C)`` that is not ``ignore_index``.
    """
    _check_sequence(logits, labels, reduction, what="token_classification")
    return _token_losses(logits, labels, ignore_index, reduction)


def seq2seq(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Per-sequence loss of an encoder-decoder model (T5, BART, ...): ``labels`` are the decoder targets and
    ``logits[:, t]`` already predicts ``labels[:, t]`` (Hugging Face builds ``decoder_input_ids`` by shifting the
    labels right, so there is NO shift here); each sequence averaged over its own target tokens
    (``reduction="mean"``) or summed (``"sum"``).

    Args:
        logits: ``[B, T, V]`` decoder logits.
        labels: ``[B, T]`` target ids, ``ignore_index`` where there is no target (padding).
        ignore_index: the label of positions that are no targets.
        reduction: ``"mean"`` (over the sequence's own target tokens; 0 for a sequence without any) or ``"sum"``.

    Returns:
        The ``[B]`` per-sequence losses in float32 (float64 for float64 logits).

    Raises:
        PerSampleLossError: if ``logits`` is not ``[B, T, V]``, ``labels`` not ``[B, T]``, or their batch sizes
            differ.
        ValueError: for an unknown ``reduction``, non-floating-point logits, non-integer labels, mismatched
            sequence lengths, or a label outside ``[0, V)`` that is not ``ignore_index``.
    """
    _check_sequence(logits, labels, reduction, what="seq2seq")
    return _token_losses(logits, labels, ignore_index, reduction)


def from_hf_output(
    output: Any,
    batch: Mapping[str, Any],
    *,
    model: Any = None,
    task: Literal["classification", "causal_lm", "token_classification", "seq2seq"] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """The ``[B]`` per-example losses of a Hugging Face forward pass, to return from ``training_step``::

        out = self.model(**batch)
        return losses.from_hf_output(out, batch, model=self.model)

    Only ``output.logits`` and ``batch["labels"]`` are used. ``output.loss`` is NEVER used: it is averaged over the
    batch (over all the batch's target tokens for a language model), so one example's share of it depends on the
    other examples and its sensitivity is not the clip bound.

    Which loss applies is decided as follows, and a case that is not decided raises instead of guessing (a causal
    LM and a token classifier both have ``[B, T, V]`` logits and ``[B, T]`` labels, but only one shifts them):

    1. ``task`` when given (the shapes are still checked);
    2. otherwise the cues that are present, which must agree: the class of ``model`` (a peft model is unwrapped
       with ``get_base_model()``): ``*ForSequenceClassification`` -> classification (with the model's
       ``config.problem_type``), ``*ForTokenClassification`` -> token classification, ``*ForCausalLM`` /
       ``*LMHeadModel`` -> causal LM, ``*ForSeq2SeqLM`` / ``*ForConditionalGeneration`` with
       ``config.is_encoder_decoder`` -> seq2seq; and the class of ``output`` (``CausalLMOutput*``,
       ``Seq2SeqLMOutput``, ``TokenClassifierOutput``, ``*SequenceClassifierOutput*``);
    3. otherwise the shapes, where they are unambiguous: 1-D or 2-D logits are a classification.

    Args:
        output: the model's output: a ``ModelOutput`` (or a Mapping) with ``logits``.
        batch: a Mapping (dict, ``BatchEncoding``) with the ``labels`` Tensor.
        model: the Hugging Face model that produced ``output`` (``self.model``, not the LightningModule), or a
            peft model wrapping one.
        task: one of ``TASKS`` to choose the loss explicitly.
        reduction: for token-level tasks, ``"mean"`` (each sequence over its own target tokens) or ``"sum"``;
            a classification has one loss per example and does not use it.
        ignore_index: the label of positions that are no targets (token-level tasks).

    Returns:
        The ``[B]`` per-example losses in float32 (float64 for float64 logits).

    Raises:
        ValueError: if ``batch`` has no ``labels`` Tensor, ``output`` no ``logits``, ``model`` no ``config``,
            ``task`` or ``reduction`` is unknown, the cues disagree, or the task cannot be decided.
        PerSampleLossError: if the logits or labels have no per-example batch dimension (see the functions above).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS} or None, got {task!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"`batch` is a {type(batch).__name__}; from_hf_output needs a Mapping with 'labels' (a dict or a "
            "BatchEncoding). For other batches call the loss of your task directly, e.g. `losses.causal_lm(logits, "
            "labels)`."
        )
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        found = "no 'labels'" if labels is None else f"'labels' of type {type(labels).__name__}"
        raise ValueError(
            f"the batch has {found} (keys: {sorted(map(str, batch.keys()))}); from_hf_output needs the targets as a "
            "Tensor batch['labels'] (for a causal LM: the input ids with padding set to -100)"
        )
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"the model output ({type(output).__name__}) has no `logits` Tensor; call the model with "
            "`return_dict=True` (the default) and pass its output"
        )

    hf_model = _unwrap(model)
    if task is None:
        task = _infer_task(output, hf_model, logits, labels)
    if task == "classification":
        problem_type = getattr(getattr(hf_model, "config", None), "problem_type", None)
        return classification(logits, labels, problem_type=problem_type)
    losses = {"causal_lm": causal_lm, "token_classification": token_classification, "seq2seq": seq2seq}[task]
    return losses(logits, labels, ignore_index=ignore_index, reduction=reduction)


# ---------------------------------------------------------------------------------------------------- internals
def _unwrap(model: Any) -> Any:
    """The Hugging Face model inside ``model`` (a peft model is unwrapped with peft's ``get_base_model()``)."""
    if model is None:
        return None
    if "peft" in sys.modules:  # a PeftModel exists only once peft has been imported
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
    if getattr(model, "config", None) is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no `config`: pass the Hugging Face model that produced the "
            "output (e.g. `model=self.model`), not the LightningModule"
        )
    return model


def _task_of_model(model: Any) -> str | None:
    name = type(model).__name__
    for suffix, task in _MODEL_SUFFIXES:
        if not name.endswith(suffix):
            continue
        if suffix == "ForConditionalGeneration" and not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{name} is a decoder-only model (config.is_encoder_decoder is False): whether its labels are "
                "shifted cannot be told from the class. Pass task='causal_lm' (labels aligned with input_ids, "
                "shifted here) or task='seq2seq' (labels already aligned with the logits)."
            )
        return task
    return None


def _task_of_output(output: Any) -> str | None:
    name = type(output).__name__
    for part, task in _OUTPUT_NAMES:
        if part in name:
            return task
    return None


def _infer_task(output: Any, model: Any, logits: Tensor, labels: Tensor) -> str:
    cues = {}
    if model is not None and (found := _task_of_model(model)) is not None:
        cues[f"the model class {type(model).__name__}"] = found
    if (found := _task_of_output(output)) is not None:
        cues[f"the output class {type(output).__name__}"] = found
    tasks = set(cues.values())
    if len(tasks) > 1:
        seen = ", ".join(f"{where} -> {task!r}" for where, task in cues.items())
        raise ValueError(f"the task cannot be decided: {seen}. Pass `task=` (one of {TASKS}).")
    if tasks:
        return tasks.pop()
    if logits.ndim in (1, 2):
        return "classification"
    where = "no `model` was given" if model is None else f"the model class {type(model).__name__} is not a known head"
    raise ValueError(
        f"cannot tell which loss applies to logits {_shape(logits)} and labels {_shape(labels)}: {where} and the "
        f"output class {type(output).__name__} does not say. A causal LM (labels shifted by one) and a token "
        "classifier or seq2seq decoder (no shift) have the same shapes. Pass `model=` (the Hugging Face model) or "
        f"`task=` (one of {TASKS}; a masked LM is task='token_classification')."
    )


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_floating(name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"`{name}` must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"`{name}` must be floating point, got {t.dtype}")


def _check_batch(logits: Tensor, labels: Any, logits_dims: tuple, labels_dims: tuple, what: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"`labels` must be a Tensor, got {type(labels).__name__}")
    if logits.ndim not in logits_dims or labels.ndim not in labels_dims:
        raise PerSampleLossError(
            f"{what} takes batch-first logits with {' or '.join(map(str, logits_dims))} dims and labels with "
            f"{' or '.join(map(str, labels_dims))} dims (dim 0 = example); got logits {_shape(logits)} and labels "
            f"{_shape(labels)}. Do not flatten the batch: one loss per example is needed."
        )
    if logits.shape[0] != labels.shape[0]:
        raise PerSampleLossError(
            f"{what}: logits {_shape(logits)} and labels {_shape(labels)} disagree on the number of examples (dim 0)"
        )


def _check_sequence(logits: Tensor, labels: Any, reduction: str, what: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}")
    _check_floating("logits", logits)
    _check_batch(logits, labels, logits_dims=(3,), labels_dims=(2,), what=what)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer token/class ids, got {labels.dtype}")
    if labels.shape[1] != logits.shape[1]:
        raise ValueError(
            f"{what}: labels {_shape(labels)} and logits {_shape(logits)} differ in sequence length (dim 1). Pass "
            "the labels of exactly the positions the logits cover (e.g. -100 for prefix tokens a peft prompt adds)."
        )


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"a {what} label is {value}, outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )


def _token_losses(logits: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Token cross-entropy of aligned ``logits [B, T, V]`` and ``labels [B, T]``, reduced per sequence."""
    labels = labels.to(logits.device)
    dtype = _compute_dtype(logits)
    batch, length, vocab = logits.shape
    _check_label_range(labels, vocab, ignore_index, what="target")
    if batch == 0 or length == 0:
        return logits.new_zeros(batch, dtype=dtype)
    tokens = F.cross_entropy(
        logits.to(dtype).reshape(-1, vocab), labels.reshape(-1).long(), ignore_index=ignore_index, reduction="none"
    ).view(batch, length)  # 0 where the label is ignore_index
    total = tokens.sum(1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(1)
    return total / count.clamp_min(1).to(dtype)  # a sequence without targets: 0 / 1 = 0, never NaN
