"""Federated DP-LoRA: 4 "institutions" fine-tune one BERT-style classifier on MNLI or QNLI without sharing their data.

    python examples/glue_federated_dplora.py                         # QNLI, client-level ε = 8, 2-5 min on 2 CPU cores
    python examples/glue_federated_dplora.py --task mnli --non-iid   # MNLI, institutions skewed by label
    python examples/glue_federated_dplora.py --noise-multiplier 0    # non-private federated LoRA (ε = ∞)
    python examples/glue_federated_dplora.py --example-eps 8 --noise-multiplier 0 --clip 1e6   # example-level DP only
    python examples/glue_federated_dplora.py --devices 2             # 2 processes (DDP) × 2 institutions each
    python examples/glue_federated_dplora.py --model PATH_OR_NAME    # any Hugging Face checkpoint

Data: ``--data-dir`` holds ``glue/{MNLI,QNLI}`` and ``tokenizers/bert-base-uncased/vocab.txt`` (default:
``../shared/data`` beside the repository when it exists). Training pairs come from the released 8,999-pair training
subsets (the first ``--train-size``), split across ``--clients`` institutions: uniformly, or with ``--non-iid`` by
label (Dirichlet(``--alpha``) proportions per label: each institution sees mostly one or two labels). Evaluation:
QNLI's dev set, or MNLI's 1,000 held-out training pairs (the official dev_matched set is not available offline); the
first ``--eval-size`` examples.

Model: without ``--model``, a small RoBERTa-style encoder built from a config (random weights, BERT uncased
vocabulary). LoRA (rank ``--rank`` on the attention query/value projections) is injected by the strategy from a
``peft.LoraConfig``, and the classification head is trained as a peft ``modules_to_save`` copy. The frozen encoder
never changes and is never sent. Only the adapters and the head travel.

What is private. By default, **client-level** DP: the unit is an institution's whole dataset, ε over all rounds from
Opacus's PRV accountant. With only 4 institutions that is a hard regime: the noise std in the average update is
σC·√K/K per coordinate, across all adapter coordinates, against a signal of norm at most C. Client-level DP pays
off with many clients (thousands in cross-device FL). For a few institutions, **example-level** DP is the usual
guarantee: ``--example-eps`` runs DP-SGD inside each institution, protecting each example against everyone, server
included. Combine it with ``--noise-multiplier 0 --clip 1e6`` to drop the client-level mechanism.

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
from sst2_dpsgd import AdamSentimentClassifier  # noqa: E402
from sst2_dpzero import DEFAULT_DATA, LABELS, Encoded, build_model, collate, load_tokenizer, read_task  # noqa: E402

from lightning_dp.mechanisms.federated import split_by_label, split_iid  # noqa: E402
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy  # noqa: E402


def load_pair_tokenizer(model: str | None, data_dir: str | None):
    """The model's own tokenizer, or the BERT uncased vocabulary from ``data_dir`` for a model built from a config or
    a local checkpoint saved without tokenizer files."""
    own = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    if model and os.path.isdir(model) and not any(os.path.exists(os.path.join(model, f)) for f in own):
        model = None
    return load_tokenizer(model, data_dir)


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
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--task", choices=sorted(LABELS), default="qnli")
    p.add_argument("--model", default=None, help="Hugging Face model name or path (default: small model from config)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--train-size", type=int, default=4000, help="first N pairs of the 8,999-pair training subset")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4, help="number of institutions")
    p.add_argument("--non-iid", action="store_true", help="split by label (Dirichlet(--alpha) proportions)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--client-fraction", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="local batch size (expected size under example-level DP)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=8.0, help="client-level target ε")
    p.add_argument("--noise-multiplier", type=float, default=None, help="client-level σ instead of --eps (0: none)")
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--clip", type=float, default=1.0, help="C: bound on each institution's adapter update per round")
    p.add_argument("--noise-placement", choices=["local", "distributed"], default="local")
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
    train_rows, dev_rows = read_task(args.task, args.data_dir)
    train_rows, dev_rows = train_rows[: args.train_size], dev_rows[: args.eval_size]
    num_labels = len(LABELS[args.task])
    tokenizer = load_pair_tokenizer(args.model, args.data_dir)
    model = build_model(args, tokenizer, num_labels)
    # Adam is built after the strategy injected LoRA: only the adapters (and the head copy) require grad
    module = AdamSentimentClassifier(model, args.lr, num_labels, average="micro")
    if args.non_iid:
        partition = split_by_label([y for _, _, y in train_rows], args.clients, args.alpha, seed=args.seed)
    else:
        partition = split_iid(len(train_rows), args.clients, seed=args.seed)
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size,
                       collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    privacy = {"noise_multiplier": args.noise_multiplier} if args.noise_multiplier is not None else {"eps": args.eps}
    strategy = DPLoRAFederatedStrategy(
        **privacy, delta=args.delta, clip=args.clip, rounds=args.rounds, local_steps=args.local_steps,
        clients=args.clients, client_fraction=args.client_fraction, partition=partition,
        noise_placement=args.noise_placement, aggregation=args.aggregation,
        lora=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                        modules_to_save=["classifier"]),
        example_eps=args.example_eps, example_clip=args.example_clip,
    )
    printer = RoundPrinter()
    trainer = L.Trainer(
        strategy=strategy, accelerator=args.accelerator, devices=args.devices, max_epochs=args.rounds,
        num_sanity_val_steps=0, callbacks=[printer], enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    if trainer.is_global_zero:
        sizes = [len(p) for p in partition]
        print(f"{args.task.upper()}: {len(train_rows)} train pairs over {args.clients} institutions {sizes} "
              f"({'non-IID by label' if args.non_iid else 'IID'}), {len(dev_rows)} eval pairs", flush=True)
    start = time.time()
    trainer.fit(module, train, dev)
    report = strategy.privacy_report()
    if trainer.is_global_zero:
        comm = report["communication"]
        ex = report["example_level"]
        print(f"final: dev acc {printer.history[-1]['dev_acc']:.4f} | client-level ε = {report['epsilon']:.3f} at "
              f"δ = {report['delta']:.1e} (σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']}, "
              f"{report['rounds']} rounds, C = {report['clip']}, {report['noise_placement']} noise)"
              + ("" if ex is None else f" | example-level ε = {ex['epsilon']:.3f} at δ = {ex['delta']:.1e} "
                 f"(σ = {ex['noise_multiplier']:.3f})")
              + f" | {comm['adapter_parameters']:,} adapter parameters: {comm['upload_bytes_per_round'] / 2**20:.3f} "
              f"MiB/round vs {comm['full_model_bytes_per_round'] / 2**20:.1f} MiB/round for full-model FedAvg "
              f"({comm['ratio_full_to_adapter']:.0f}x) | {time.time() - start:.0f} s", flush=True)
    return printer.history, report


if __name__ == "__main__":
    main()
