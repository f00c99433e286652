"""Small models and data shared by the tests."""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

# the Trainers' root folders of one test session, removed when the session's interpreter exits
_RUNS = tempfile.TemporaryDirectory(prefix="ldp-tests-")


def run_dir() -> str:
    """A fresh folder for one Trainer's outputs (under a session folder that is removed at exit)."""
    return tempfile.mkdtemp(dir=_RUNS.name)


def linear_data(n: int = 64, d: int = 8, classes: int = 2, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w).argmax(-1)
    return TensorDataset(x, y)


class TinyClassifier(LightningModule):
    """A 2-layer MLP returning per-example losses (the DP contract)."""

    def __init__(self, d: int = 8, hidden: int = 16, classes: int = 2, lr: float = 0.05, dropout: float = 0.0,
                 output: str = "tensor", weight_decay: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, classes))
        self.lr = lr
        self.output = output
        self.weight_decay = weight_decay
        self.calls = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        if self.output == "tensor":
            return losses
        if self.output == "dict":
            return {"loss": losses.mean(), "per_sample_loss": losses}
        if self.output == "mean":
            return losses.mean()
        if self.output == "dict_no_psl":
            return {"loss": losses.mean()}
        raise ValueError(self.output)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def loader(dataset: Dataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def with_threads(threads: int, fn):
    """``fn()`` under ``torch.set_num_threads(threads)``, the previous setting restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])


def trainer_kwargs(**overrides):
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_steps=5, default_root_dir=run_dir())
    kw.update(overrides)
    return kw


def clipped_difference_mean(
    model: nn.Module, directions, x, y, lam: float, clip: float, expected_batch: int
) -> float:
    """Reference DPZero scalar with σ = 0: Σ_i clip_C((ℓ_i(θ+λz) − ℓ_i(θ−λz)) / 2λ) / E[B], computed by
    moving ``model``'s parameters along ``directions`` (one tensor per parameter) and back."""
    params = list(model.parameters())
    with torch.no_grad():
        losses = []
        for sign in (1, -1):
            for p, z in zip(params, directions):
                p.add_(sign * lam * z)
            losses.append(F.cross_entropy(model(x), y, reduction="none"))
            for p, z in zip(params, directions):
                p.sub_(sign * lam * z)
    return ((losses[0].double() - losses[1].double()) / (2 * lam)).clamp(-clip, clip).sum().item() / expected_batch
