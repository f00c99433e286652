"""Run DPLoRAFederatedStrategy on 1 or N CPU processes (Lightning's own `ddp` launcher re-runs this script per rank)
and dump, per rank and per configuration, what the tests check: base weights before/after, the global adapters
after every round, every collective call's size, the per-client clipped norms and the privacy report.
Used by tests/test_federated.py. Several configurations run one after the other in the same processes."""

import argparse
import json
import os
import sys
from datetime import timedelta

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from helpers import linear_data, loader  # noqa: E402

from lightning_dp.mechanisms.collective import Collective  # noqa: E402
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy  # noqa: E402


class Net(L.LightningModule):
    """A 2-layer MLP; LoRA is injected by the strategy into both layers."""

    def __init__(self, lr=0.05, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        self.lr = lr
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        return F.cross_entropy(self.fc2(torch.tanh(self.fc1(x))), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class RecordingCollective(Collective):
    """Forwards to the strategy's collective and records the size of every tensor all-reduced."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.sizes = []

    def all_reduce_sum(self, tensor):
        self.sizes.append([tensor.numel(), tensor.element_size()])
        return self.inner.all_reduce_sum(tensor)

    def broadcast_int(self, value, src=0):
        return self.inner.broadcast_int(value, src)


class RecordingStrategy(DPLoRAFederatedStrategy):
    def setup_mechanism(self, trainer):
        self._collective = RecordingCollective(self._collective)
        super().setup_mechanism(trainer)


class RoundRecorder(L.Callback):
    def __init__(self):
        self.globals = []

    def on_train_start(self, trainer, pl_module):
        self.globals.append(trainer.strategy._global.clone())

    def on_train_epoch_end(self, trainer, pl_module):  # one epoch = one round
        self.globals.append(trainer.strategy._global.clone())


def run(config, devices):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = Net(lr=config["lr"], hidden=config.get("hidden", 32))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_objects = dict(model.named_parameters())
    strategy = RecordingStrategy(
        noise_multiplier=config["sigma"], clip=config["clip"], rounds=config["rounds"], local_steps=2, clients=4,
        partition=config["partition"], noise_placement=config["placement"], sampling_seed=11, accountant="rdp",
        lora=LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"]), timeout=timedelta(seconds=120),
    )
    rec = RoundRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=config["rounds"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )
    trainer.fit(model, loader(linear_data(n=64), 8))
    uploads = [[u.client, u.sampled, u.shard_size, u.update_norm, u.clipped_norm, u.noise_std]
               for e in strategy._round_log for u in e["uploads"]]
    return {
        "world_size": trainer.world_size,
        "base_unchanged": all(torch.equal(base_objects[n], base[n]) for n in base),
        "adapter_names": strategy.adapters.names,
        "adapter_numel": strategy.adapters.numel,
        "lora_numel": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "collective_sizes": strategy._collective.sizes,
        "globals": torch.stack(rec.globals),
        "uploads": uploads,
        "calls": model.calls,
        "report": strategy.privacy_report(),
        "rank": trainer.global_rank,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--configs", required=True, help="JSON list of configurations")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [run(config, args.devices) for config in json.loads(args.configs)]
    torch.save(results, f"{args.out}.rank{results[0]['rank']}.pt")


if __name__ == "__main__":
    main()
