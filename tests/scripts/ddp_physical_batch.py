"""Run DPSGDStrategy or DPZeroStrategy with ``max_physical_batch_size`` on 1 or N CPU processes (Lightning's own
`ddp` launcher re-runs this script per rank) and dump, per rank, the final parameters, every step's parameters
and the size of every chunk its training_step saw. Used by tests/test_physical_batch.py."""

import argparse
import os
import sys
from datetime import timedelta

import lightning.pytorch as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from helpers import TinyClassifier, flat_params, linear_data, loader  # noqa: E402

from lightning_dp import DPSGDStrategy, DPZeroStrategy  # noqa: E402


class Recorder(L.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(flat_params(pl_module))


class Chunked(TinyClassifier):
    """Records (step, size) of every (chunk of a) batch its training_step sees; float64 for DPZero (its finite
    differences over λ would amplify the float32 rounding of the losses, which depends on the rows of a product)."""

    def __init__(self, dtype, **kw):
        super().__init__(**kw)
        self.to(dtype)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.trainer.global_step, int(x.shape[0])))
        return super().training_step((x.to(self.dtype), y), batch_idx)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["bk", "ghost", "dpzero"], default="bk")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-physical-batch-size", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Chunked(torch.float64 if args.method == "dpzero" else torch.float32, lr=0.5)
    rec = Recorder()
    common = dict(noise_multiplier=0.0, sampling_seed=7, accountant="rdp", timeout=timedelta(seconds=120),
                  max_physical_batch_size=args.max_physical_batch_size or None)
    if args.method == "dpzero":
        strategy = DPZeroStrategy(clip=0.5, zo_eps=1e-2, seed=123, **common)
    else:
        strategy = DPSGDStrategy(clip=0.5, clipping=args.method, **common)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )
    trainer.fit(model, loader(linear_data(n=64), args.batch_size))
    torch.save(
        {
            "params": flat_params(model),
            "steps": torch.stack(rec.params),
            "seen": model.seen,
            "report": strategy.privacy_report(),
            "world_size": trainer.world_size,
        },
        f"{args.out}.rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
