"""Compatibility with what real projects turn on: Hugging Face gradient checkpointing and ``torch.compile``.

Each case compares the private update with the same run without the feature (σ = 0, the same Poisson masks, an
active clip), so a hook that missed a use or a compiled graph that bypassed the perturbation would show."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPSGDStrategy, DPZeroStrategy, ValidationError

transformers = pytest.importorskip("transformers")


def _bert(checkpointing):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model


class Wrapper(L.LightningModule):
    def __init__(self, model, hf=True):
        super().__init__()
        self.model = model
        self.hf = hf
        self.forwards = 0

    def training_step(self, batch, batch_idx):
        self.forwards += 1
        x, y = batch
        out = self.model(input_ids=x).logits if self.hf else self.model(x)
        return F.cross_entropy(out, y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _ids_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(1, 50, (32, 8), generator=g), torch.randint(0, 2, (32,), generator=g))


def _fit(module, strategy, data, steps=2):
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=8))
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _dpsgd(mode, clip=0.05):
    return DPSGDStrategy(noise_multiplier=0.0, clip=clip, clipping=mode, sampling_seed=3, seed=3, accountant="rdp")


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_non_reentrant_gradient_checkpointing_gives_the_same_private_update(mode):
    start = torch.cat([p.detach().flatten() for p in _bert(None).parameters()])
    plain = _fit(Wrapper(_bert(None)), _dpsgd(mode), _ids_data())
    checkpointed_model = _bert(False)
    assert checkpointed_model.is_gradient_checkpointing
    checkpointed = _fit(Wrapper(checkpointed_model), _dpsgd(mode), _ids_data())
    assert (plain - start).abs().max() > 1e-4  # it trained (clipped: the per-example norms matter)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_reentrant_gradient_checkpointing_is_refused_before_any_step():
    module = Wrapper(_bert(True))
    with pytest.raises(ValidationError, match="use_reentrant"):
        _fit(module, _dpsgd("bk"), _ids_data())
    assert module.forwards == 0


def _mlp_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))


def _mlp(compiled):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    # the "eager" backend runs TorchDynamo's capture (graph breaks at the hooks included) without code generation,
    # which takes minutes on a CPU; the default inductor backend was checked to give the same result
    return torch.compile(net, backend="eager") if compiled else net


@pytest.mark.parametrize("which", ["bk", "ghost", "dpzero"])
def test_torch_compile_of_the_model_gives_the_same_private_update(which):
    def strategy():
        if which == "dpzero":
            return DPZeroStrategy(noise_multiplier=0.0, clip=1.0, sampling_seed=3, seed=3, accountant="rdp")
        return _dpsgd(which, clip=0.1)

    torch._dynamo.reset()
    plain = _fit(Wrapper(_mlp(False), hf=False), strategy(), _mlp_data(), steps=3)
    compiled = _fit(Wrapper(_mlp(True), hf=False), strategy(), _mlp_data(), steps=3)
    start = torch.cat([p.detach().flatten() for p in _mlp(False).parameters()])
    assert (plain - start).abs().max() > 1e-4
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-6)
