"""Run DPZeroStrategy on 1 or N CPU processes (Lightning's own `ddp` launcher re-runs this script per rank) and
dump, per rank, the final parameters and every step's released scalar. Used by tests/test_ddp.py."""

import argparse
import os
import sys
from datetime import timedelta

import lightning.pytorch as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from helpers import TinyClassifier, flat_params, linear_data, loader  # noqa: E402

from lightning_dp import DPZeroStrategy, StagewiseZO, ZOPruning  # noqa: E402


class Recorder(L.Callback):
    def __init__(self):
        self.steps = []  # the first direction's release of every step
        self.directions = []  # every direction's release of every step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        releases = [[r.projected_grad, r.clipped_sum, r.noise, r.num_examples] for r in trainer.strategy.last_steps]
        self.steps.append(releases[0])
        self.directions.append(releases)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--noise-multiplier", type=float, default=0.0)
    parser.add_argument("--poisson", type=int, default=1)
    parser.add_argument("--num-directions", type=int, default=1)
    parser.add_argument("--sparse", type=int, default=0, help="ZOPruning(0.3) + StagewiseZO(2 stages, prox)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.05)
    model.example_input_array = torch.zeros(1, 8)  # the constant input of ZOPruning's data-free score
    initial = flat_params(model)
    rec = Recorder()
    callbacks = [rec]
    if args.sparse:
        callbacks += [ZOPruning(trainable_fraction=0.3), StagewiseZO(stages=2, first_stage_steps=2, prox=0.1)]
    strategy = DPZeroStrategy(
        noise_multiplier=args.noise_multiplier, clip=2.0, seed=123, sampling_seed=7,
        poisson_sampling=bool(args.poisson), accountant="rdp",
        num_directions=args.num_directions, timeout=timedelta(seconds=120),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader(linear_data(n=64), args.batch_size))
    torch.save(
        {
            "params": flat_params(model),
            "initial": initial,
            "steps": rec.steps,
            "directions": rec.directions,
            "report": strategy.privacy_report(),
            "world_size": trainer.world_size,
        },
        f"{args.out}.rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
