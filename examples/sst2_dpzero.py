"""Private zeroth-order fine-tuning (DPZero) of a RoBERTa-style classifier on SST-2, with one Trainer argument.

    python examples/sst2_dpzero.py                      # defaults: finish in a few minutes on 2 CPU cores
    python examples/sst2_dpzero.py --eps 3 --max-steps 4000 --trainable all
    python examples/sst2_dpzero.py --model roberta-base --trainable all --accelerator gpu   # real weights, with internet
    torchrun --nproc_per_node 4 examples/sst2_dpzero.py --accelerator gpu --devices 4      # DDP, same class

Data: ``--data-dir`` holds ``glue/SST-2/{train,dev}.tsv`` and ``tokenizers/bert-base-uncased/vocab.txt`` (default:
``../shared/data`` beside the repository when it exists). Without it, GLUE SST-2 is loaded through the ``datasets``
package (internet needed). Without ``--model``, a small RoBERTa-style model is built from a config (random
weights: no weights are downloaded); ``--model NAME_OR_PATH`` loads any Hugging Face checkpoint.

The LightningModule is ordinary except for one thing every DP method needs: ``training_step`` returns the loss of
each example (``reduction="none"``), not the batch mean.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPZeroStrategy, PrivacyBudget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def read_sst2(data_dir: str | None):
    """(train, dev) as lists of (sentence, label)."""
    if data_dir and os.path.isdir(os.path.join(data_dir, "glue", "SST-2")):
        out = []
        for split in ("train", "dev"):
            with open(os.path.join(data_dir, "glue", "SST-2", f"{split}.tsv"), newline="") as f:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                next(reader)
                out.append([(row[0].strip(), int(row[1])) for row in reader])
        return out[0], out[1]
    from datasets import load_dataset  # users with internet

    ds = load_dataset("glue", "sst2")
    return [(r["sentence"], r["label"]) for r in ds["train"]], [(r["sentence"], r["label"]) for r in ds["validation"]]


def load_tokenizer(model: str | None, data_dir: str | None):
    if model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    from transformers import BertTokenizerFast

    path = os.path.join(data_dir or "", "tokenizers", "bert-base-uncased")
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        return BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True)
    return BertTokenizerFast.from_pretrained("bert-base-uncased")


def build_model(args, tokenizer):
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    if args.model:
        return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.max_length + 2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        type_vocab_size=1,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


class Encoded(Dataset):
    def __init__(self, rows, tokenizer, max_length):
        enc = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.labels = torch.tensor([y for _, y in rows])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def collate(samples):
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    width = int(batch["attention_mask"].sum(1).max())  # trim padding to the longest sequence of the batch
    batch["input_ids"] = batch["input_ids"][:, :width]
    batch["attention_mask"] = batch["attention_mask"][:, :width]
    return batch


class SentimentClassifier(L.LightningModule):
    def __init__(self, model, lr: float):
        super().__init__()
        self.model = model
        self.lr = lr
        self.dev_accuracy = MulticlassAccuracy(num_classes=2)

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example = F.cross_entropy(logits.float(), batch["labels"], reduction="none")  # the DP contract: [B]
        return {"loss": per_example.mean(), "per_sample_loss": per_example}

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.dev_accuracy.update(logits.argmax(-1), batch["labels"])
        self.log("dev_acc", self.dev_accuracy, prog_bar=True)

    def configure_optimizers(self):
        # DPZero is zeroth-order SGD: it takes the lr (and weight_decay, schedulers) of a plain SGD optimizer
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def select_trainable(model, mode: str):
    if mode == "all":
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))
    for name, p in model.named_parameters():  # "head": the classification head only
        p.requires_grad_(name.startswith("classifier"))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--model", default=None, help="Hugging Face model name or path (default: small model from config)")
    p.add_argument("--trainable", choices=["all", "head", "lora"], default="all")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="use the first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="evaluate on the first N dev examples (0: all 872)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--clip", type=float, default=10.0)
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_rows, dev_rows = read_sst2(args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.dev_size:
        dev_rows = dev_rows[: args.dev_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    model = select_trainable(build_model(args, tokenizer), args.trainable)
    module = SentimentClassifier(model, args.lr)
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size, collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    strategy = DPZeroStrategy(eps=args.eps, delta=args.delta, clip=args.clip, zo_eps=args.zo_eps)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=min(args.val_every, args.max_steps),
        check_val_every_n_epoch=None,
        callbacks=[PrivacyBudget(log_every_n_steps=50)],
        enable_checkpointing=False,
        log_every_n_steps=50,
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainer.is_global_zero:
        print(f"SST-2: {len(train_rows)} train / {len(dev_rows)} dev; {n_trainable / 1e6:.2f}M trainable parameters")
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
    return result, report


if __name__ == "__main__":
    main()
