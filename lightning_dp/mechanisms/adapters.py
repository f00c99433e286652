"""LoRA adapters on plain modules (no Lightning import): which tensors peft added, found through peft's own layer
classes (``BaseTunerLayer`` and the ``modules_to_save`` wrappers, with the adapter layers they declare), never by
parameter name; the flat vector of the tensors that travel; a fingerprint of the frozen rest; and the error of
averaging LoRA factors instead of their products."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "AdapterVector",
    "adapter_parameters",
    "fingerprint",
    "lora_a_parameters",
    "lora_product_gap",
]

_LORA_A_LAYERS = ("lora_A", "lora_embedding_A")  # the down-projections among a LoraLayer's `adapter_layer_names`


def _adapter_layers(module: nn.Module) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """Every peft layer in ``module`` with the names of its adapter sub-layers (``adapter_layer_names``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for sub in module.modules():
        if isinstance(sub, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            yield sub, tuple(sub.adapter_layer_names)


def _named(module: nn.Module, params: set[int]) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if id(p) in params]


def adapter_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The tensors peft added to ``module`` (of every adapter it holds), in ``named_parameters`` order: LoRA factors
    (``lora_A``/``lora_B``, their embedding variants, DoRA's magnitude vector) and the trainable copies of
    ``modules_to_save`` modules. The base layers they wrap (``base_layer``, ``original_module``) are not adapters."""
    ids = set()
    for layer, names in _adapter_layers(module):
        for name in names:
            sub = getattr(layer, name, None)
            if isinstance(sub, nn.Module):
                ids.update(id(p) for p in sub.parameters())
    return _named(module, ids)


def lora_a_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The down-projection factors A of every LoRA layer (frozen under ``aggregation="b_only"``)."""
    from peft.tuners.lora import LoraLayer

    ids = set()
    for layer, names in _adapter_layers(module):
        if isinstance(layer, LoraLayer):
            for name in set(names) & set(_LORA_A_LAYERS):
                ids.update(id(p) for p in getattr(layer, name).parameters())
    return _named(module, ids)


def fingerprint(named_tensors: Sequence[tuple[str, Tensor]]) -> int:
    """A 56-bit SHA-256 fingerprint of names and exact bytes (ranks compare it instead of sending the tensors)."""
    digest = hashlib.sha256()
    for name, t in named_tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "little")


class AdapterVector:
    """The tensors that travel (every trainable adapter tensor) viewed as one flat fp32 vector."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
        if not named_params:
            raise ValueError("no adapter tensor to federate")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @torch.no_grad()
    def read(self) -> Tensor:
        """A flat fp32 copy of the current values."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def write_(self, flat: Tensor) -> None:
        """Copy ``flat`` into the parameters (in place)."""
        if flat.numel() != self.numel:
            raise ValueError(f"expected {self.numel} values, got {flat.numel()}")
        for p, chunk in zip(self.params, torch.split(flat, self.sizes)):
            p.copy_(chunk.view(p.shape))

    def named_chunks(self, flat: Tensor) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` of each adapter tensor in ``flat``, shaped and typed like its parameter (copies)."""
        for name, p, chunk in zip(self.names, self.params, torch.split(flat, self.sizes)):
            yield name, chunk.view(p.shape).to(dtype=p.dtype).clone()


def lora_product_gap(a_updates: Sequence[Tensor], b_updates: Sequence[Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``avg_k(B_k A_k) − avg(B_k)·avg(A_k)`` for clients starting from (A, B) with factor updates (δA_k, δB_k):
    the error of averaging the factors instead of the products. It equals the cross term
    ``avg(δB_k δA_k) − avg(δB_k)·avg(δA_k)`` and vanishes when every δA_k is 0 (``aggregation="b_only"``)."""
    bs = [b + db for db in b_updates]
    as_ = [a + da for da in a_updates]
    avg_product = torch.stack([bk @ ak for bk, ak in zip(bs, as_)]).mean(0)
    return avg_product - torch.stack(bs).mean(0) @ torch.stack(as_).mean(0)
