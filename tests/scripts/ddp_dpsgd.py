"""Run DPSGDStrategy on 1 or N CPU processes (Lightning's own `ddp` launcher re-runs this script per rank) and
dump, per rank, the final parameters and every step's private gradient as seen by `on_before_optimizer_step`.
Used by tests/test_dpsgd_ddp.py."""

import argparse
import os
import sys
from datetime import timedelta

import lightning.pytorch as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from helpers import TinyClassifier, flat_params, linear_data, loader  # noqa: E402

from lightning_dp import DPSGDStrategy  # noqa: E402


class Recorder(L.Callback):
    def __init__(self):
        self.grads = []
        self.examples = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in pl_module.parameters()]))
        self.examples.append(trainer.strategy.last_step.num_examples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--noise-multiplier", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clipping", default="auto")
    parser.add_argument("--uneven", action="store_true", help="rank r holds 64 + 8r examples (must be refused)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyClassifier(lr=args.lr)
    rec = Recorder()
    strategy = DPSGDStrategy(
        noise_multiplier=args.noise_multiplier, clip=1.0, seed=123, sampling_seed=7, accountant="rdp",
        clipping=args.clipping, timeout=timedelta(seconds=120),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )
    n = 64 + (8 * int(os.environ.get("LOCAL_RANK", 0)) if args.uneven else 0)
    trainer.fit(model, loader(linear_data(n=n), args.batch_size))
    torch.save(
        {
            "params": flat_params(model),
            "grads": torch.stack(rec.grads),
            "examples": rec.examples,
            "report": strategy.privacy_report(),
            "world_size": trainer.world_size,
        },
        f"{args.out}.rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
