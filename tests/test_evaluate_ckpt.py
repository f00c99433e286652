"""``trainer.validate(model, ckpt_path=...)`` and ``trainer.test(model, ckpt_path=...)`` evaluate a checkpoint that a
DP fit wrote, with every strategy (for the federated one: its global adapters), on a fresh module and strategy."""

import importlib.util
import os
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, linear_data, loader, trainer_kwargs

from lightning_dp import DPLoRAFederatedStrategy, DPSGDStrategy, DPZeroStrategy

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_federated.py")
_spec = importlib.util.spec_from_file_location("ddp_federated_evaluate", SCRIPT)
ddp_federated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_federated)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"])


class Tiny(TinyClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))


class FedNet(ddp_federated.Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.fc2(torch.tanh(self.fc1(x))), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.fc2(torch.tanh(self.fc1(x))), y))


CASES = {  # (strategy of the fit, of the evaluation: other privacy settings, which evaluation does not use)
    "dpsgd": (lambda: DPSGDStrategy(noise_multiplier=0.5, clip=1.0), lambda: DPSGDStrategy(eps=3.0, clip=0.1),
              lambda: Tiny(lr=0.5), {"max_steps": 4}),
    "dpzero": (lambda: DPZeroStrategy(noise_multiplier=0.5, clip=1.0), lambda: DPZeroStrategy(eps=3.0, clip=0.1),
               lambda: Tiny(lr=0.5), {"max_steps": 4}),
    "federated": (lambda: DPLoRAFederatedStrategy(noise_multiplier=0.5, clip=1.0, rounds=2, clients=2, lora=lora()),
                  lambda: DPLoRAFederatedStrategy(eps=3.0, clip=0.1, clients=4, lora=lora()),
                  lambda: FedNet(lr=0.5), {"max_steps": -1, "max_epochs": None}),
}


def _expected_loss(make_model, state_dict, federated, data):
    """The loss of the checkpoint's weights, computed without any strategy."""
    model = make_model()
    if federated:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora(), model)
    model.load_state_dict(state_dict)
    x, y = data.tensors
    with torch.no_grad():
        return float(F.cross_entropy(model.fc2(torch.tanh(model.fc1(x))) if federated else model(x), y))


@pytest.mark.parametrize("name", list(CASES))
def test_validate_and_test_load_the_checkpoint_of_a_fit(name, tmp_path):
    make_strategy, make_evaluator, make_model, limits = CASES[name]
    torch.manual_seed(0)
    trained = make_model()
    trainer = L.Trainer(strategy=make_strategy(), **trainer_kwargs(**limits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(trained, loader(linear_data(n=64), 8))
    path = str(tmp_path / "fit.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    data = linear_data(n=32, seed=3)
    expected = _expected_loss(make_model, state, name == "federated", data)
    for evaluate, key in (("validate", "val_loss"), ("test", "test_loss")):
        torch.manual_seed(1)  # other initial weights: only loading the checkpoint gives the expected loss
        fresh = make_model()
        x, y = data.tensors
        with torch.no_grad():
            before = float(F.cross_entropy(fresh.fc2(torch.tanh(fresh.fc1(x))) if name == "federated" else fresh(x), y))
        # at the tolerance of the check below (the trained weights carry secret noise: at 1e-3 a fresh model's loss
        # landed that close to theirs by chance)
        assert before != pytest.approx(expected, rel=1e-5)
        evaluator = L.Trainer(strategy=make_evaluator(), accelerator="cpu", devices=1, logger=False,
                              enable_progress_bar=False, default_root_dir=str(tmp_path))
        result = getattr(evaluator, evaluate)(fresh, loader(data, 32), ckpt_path=path, verbose=False)
        assert result[0][key] == pytest.approx(expected, rel=1e-5)
        weights = fresh.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in state.items())
