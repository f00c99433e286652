"""DP-Adam (DP-SGD's clipped, noised gradient fed to Adam) on SST-2 with one Trainer argument.

    python examples/sst2_dpsgd.py                       # defaults: ε = 8, 200 steps, about 5 min on 2 CPU cores
    python examples/sst2_dpsgd.py --eps 3 --max-steps 2000
    python examples/sst2_dpsgd.py --rmt                 # + RMT denoising of each weight-matrix gradient (same ε)
    python examples/sst2_dpsgd.py --task qnli --trainable lora --batch-size 256 --lr 5e-3     # a sentence-pair task
    python examples/sst2_dpsgd.py --model roberta-base --accelerator gpu --batch-size 1024 --lr 5e-4  # real weights

Data, tokenizer and model are those of ``examples/sst2_dpzero.py`` (imported from it): ``--data-dir`` holds
``glue/SST-2/{train,dev}.tsv`` and ``tokenizers/bert-base-uncased/vocab.txt`` (default: ``../shared/data`` beside
the repository when it exists); without ``--model`` a small RoBERTa-style classifier is built from a config (random
weights), ``--model NAME_OR_PATH`` loads a Hugging Face checkpoint. By default the random token-embedding matrix is
frozen (``--trainable no-word-embeddings``): it is most of the small model's parameters, hence most of the noise.

Status: on 2 CPU cores the default run reaches ε = 8.0 but dev accuracy stays at chance (0.50 macro accuracy) after
200 steps, while the same model trained non-privately (mean loss, Adam 2e-3, B = 128) reaches about 0.80 after 120
steps; from-scratch models need far more private steps (or a pretrained ``--model``).

The only differences from a non-private run: ``training_step`` returns the loss of each example
(``reduction="none"``), and ``Trainer(strategy=DPSGDStrategy(eps=8))``. The optimizer is an ordinary
``torch.optim.Adam``: the strategy hands it the private gradient ``(Σ_i c_i ∇_i + N(0, σ²C²)) / (q N)``. Batches are
drawn by Poisson sampling with the DataLoader's ``batch_size`` as the expected size.
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
from sst2_dpzero import (  # noqa: E402
    DEFAULT_DATA,
    Encoded,
    TASKS,
    SentimentClassifier,
    build_model,
    collate,
    load_tokenizer,
    num_labels,
    read_glue,
    select_trainable,
)

from lightning_dp import DPSGDStrategy, PrivacyBudget  # noqa: E402
from lightning_dp.callbacks.rmt import RMTDenoise  # noqa: E402


class AdamSentimentClassifier(SentimentClassifier):
    """The DPZero example's module (per-example losses, torchmetrics dev accuracy) with Adam instead of SGD."""

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--task", choices=TASKS, default="sst2", help="GLUE task (qnli/mnli: sentence pairs)")
    p.add_argument("--model", default=None, help="Hugging Face model name or path (default: small model from config)")
    p.add_argument("--trainable", choices=["all", "head", "lora", "no-word-embeddings"], default="no-word-embeddings",
                   help="no-word-embeddings: all but the [V, d] token embedding matrix (random, frozen), which "
                        "holds most of the parameters of the small model and so most of the DP noise")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="use the first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="evaluate on the first N dev examples (0: all 872)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--noise-multiplier", type=float, default=None, help="σ instead of --eps (ε is then reported)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128, help="expected batch size (Poisson sampling)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clipping", choices=["auto", "bk", "ghost"], default="auto",
                   help="bk: one backward (fastest); ghost: two backwards at the memory of non-private training")
    p.add_argument("--rmt", action="store_true",
                   help="denoise the private gradient of each weight matrix (RMTDenoise: post-processing, same ε)")
    p.add_argument("--rmt-kappa", type=float, default=1.0, help="RMTDenoise threshold, in units of the bulk edge")
    p.add_argument("--rmt-min-dim", type=int, default=64, help="RMTDenoise skips matrices with min(m, n) below it")
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_rows, dev_rows = read_glue(args.task, args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.dev_size:
        dev_rows = dev_rows[: args.dev_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    model = build_model(args, tokenizer, num_labels(args.task))
    if args.trainable == "no-word-embeddings":
        model.get_input_embeddings().weight.requires_grad_(False)
    else:
        model = select_trainable(model, args.trainable)
    module = AdamSentimentClassifier(model, args.lr, num_labels(args.task))
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size, collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    if args.noise_multiplier is not None:
        strategy = DPSGDStrategy(noise_multiplier=args.noise_multiplier, delta=args.delta, clip=args.clip,
                                 clipping=args.clipping)
    else:
        strategy = DPSGDStrategy(eps=args.eps, delta=args.delta, clip=args.clip, clipping=args.clipping)
    rmt = RMTDenoise(kappa=args.rmt_kappa, min_dim=args.rmt_min_dim) if args.rmt else None
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=min(args.val_every, args.max_steps),
        check_val_every_n_epoch=None,
        callbacks=[PrivacyBudget(log_every_n_steps=50)] + ([rmt] if rmt is not None else []),
        enable_checkpointing=False,
        log_every_n_steps=50,
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainer.is_global_zero:
        print(f"{args.task}: {len(train_rows)} train / {len(dev_rows)} dev; {n_trainable / 1e6:.2f}M trainable parameters")
    start = time.time()
    trainer.fit(module, train, dev)
    result = trainer.validate(module, dev, verbose=False)[0]
    report = strategy.privacy_report()
    if trainer.is_global_zero:
        print(
            f"dev accuracy {result['dev_acc']:.4f} | ε = {report['epsilon']:.3f} (target {report['target_epsilon']}) "
            f"at δ = {report['delta']:.2e} | σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']:.2e}, "
            f"{report['steps']} steps, C = {report['clip']} | {time.time() - start:.0f} s"
        )
        if rmt is not None:
            print(f"RMTDenoise: {rmt.mean_ms_per_step:.1f} ms/step; surviving singular values at the last step: "
                  f"{sum(rmt.last_ranks.values())} over {len(rmt.last_ranks)} matrices")
    return result, report


if __name__ == "__main__":
    main()
