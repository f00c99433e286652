"""Private zeroth-order fine-tuning (DPZero) of a RoBERTa-style classifier on SST-2, with one Trainer argument.

    python examples/sst2_dpzero.py                      # defaults: ~1 min on 2 idle CPU cores (4 min shared), ε = 8
    python examples/sst2_dpzero.py --eps 3 --max-steps 4000 --trainable all --lr 1e-5
    python examples/sst2_dpzero.py --model roberta-base --trainable all --lr 1e-6 --clip 100 --max-steps 10000 \
        --accelerator gpu                                # real weights (internet): where DPZero gets real accuracy
    torchrun --nproc_per_node 4 examples/sst2_dpzero.py --accelerator gpu --devices 4      # DDP, same class
    python examples/sst2_dpzero.py --trainable all --lr 1e-5 --stages 3 --zo-eps-end 1e-4 --prune 0.01
                                                         # stagewise DP-ZO (DP-ZOSO) + data-free pruning (DP-ZOPO)

Data: ``--data-dir`` holds ``glue/SST-2/{train,dev}.tsv`` and ``tokenizers/bert-base-uncased/vocab.txt`` (default:
``../shared/data`` beside the repository when it exists). Without it, GLUE SST-2 is loaded through the ``datasets``
package (internet needed). ``--task qnli`` / ``--task mnli`` runs the same on a GLUE sentence-pair task (the
training subsets of ``glue/{QNLI,MNLI}``; evaluated on QNLI's dev set, or MNLI's 1,000 held-out training pairs).
Without ``--model``, a small RoBERTa-style model is built from a config (random weights: no weights are
downloaded); ``--model NAME_OR_PATH`` loads any Hugging Face checkpoint.

What to expect. The defaults (random-init model, hidden 128, 1 layer, classification head trained, 1000 steps of B =
64 at ε = 8) demonstrate the whole pipeline quickly: Poisson sampling, σ calibrated for ε, two probes and one noised
scalar per step, the privacy report. They do *not* give a useful classifier: from random weights the dev accuracy
(macro-averaged: 0.50 is chance, and exactly 0.50 means one class for every sentence) stays at ~0.50. This is a
property of zeroth-order training from scratch, not of the settings: DPZero/MeZO rely on a pretrained model whose
loss has a low effective dimension. Here the features of a random encoder carry little linearly usable signal (a
perfectly fitted linear probe on them reaches ~0.55-0.61 dev), the signal that does exist (the word embeddings:
first-order Adam on all weights reaches 0.80 in 250 steps) lives in millions of parameters, and even exact-gradient
SGD, which DPZero approximates, makes no progress from this initialization within the budget. Use ``--model`` with a
pretrained checkpoint for accuracy (DPZero: 92% on SST-2 with RoBERTa-large at ε = 6, with λ = 1e-3, lr = 1e-6, C =
50-400, 10k steps).

Choosing ``--clip``: C bounds each example's finite difference ``s_i = (ℓ⁺ − ℓ⁻)/2λ`` and the noise on the released
scalar has std σ·C/B, so set C near the typical |s_i| (about 0.7-2 for the default head-only model; hundreds for a
fully fine-tuned large model). Err on the large side: a C that clips most examples biases the scalar more than
the noise it saves (LoRA on the pretrained tiny model of ``benchmarks/pretrain_tiny.py``: with C = 2, about the
median |s_i|, DPZero stayed at chance even with σ = 0; ``benchmarks/utility.py`` uses C = 10). ``--lr`` must shrink as the number of trained parameters grows (the ZO step
``η·ĝ·z`` has norm ~ η·|ĝ|·sqrt(d)): 1e-4 for the head, 1e-5 or less for all weights of the small model.

Stagewise schedule and pruning (Liu et al., arXiv 2402.07818): ``--stages S`` runs S stages of doubling length
that halve the learning rate (``--lr-decay``) and decay λ geometrically to ``--zo-eps-end``, with an optional
proximal pull ``--prox γ`` toward each stage's start point (``StagewiseZO``); ``--prune F`` trains only the fraction
F of the trainable coordinates chosen by a data-free score (``ZOPruning``, ``--prune-score zo_hessian|magnitude``);
``--num-directions q`` averages q directions per step (one mechanism at σ/√q per step: σ is √q times larger).

The LightningModule is ordinary except for one thing every DP method needs: ``training_step`` returns the loss of
each example (``reduction="none"``), not the batch mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPZeroStrategy, PrivacyBudget
from lightning_dp.callbacks.pruning import ZOPruning
from lightning_dp.callbacks.stagewise import StagewiseZO

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


LABELS = {
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1},
}


def _read_json_pairs(path: str, labels: dict[str, int]) -> list[tuple[str, str, int]]:
    with open(path) as f:
        rows = json.load(f)
    return [(r["text_a"], r["text_b"], labels[r["label"]]) for _, r in sorted(rows.items(), key=lambda kv: int(kv[0]))]


def read_task(task: str, data_dir: str | None):
    """(train, eval) lists of (text_a, text_b, label) of a sentence-pair task (training subsets of ``data_dir``;
    eval: QNLI's dev set, MNLI's 1,000 held-out training pairs)."""
    labels = LABELS[task]
    if data_dir and os.path.isdir(os.path.join(data_dir, "glue", task.upper())):
        root = os.path.join(data_dir, "glue", task.upper())
        train = _read_json_pairs(os.path.join(root, "train_subset_8999.json"), labels)
        if task == "mnli":
            dev = _read_json_pairs(os.path.join(root, "train_heldout_1000.json"), labels)
        else:
            with open(os.path.join(root, "dev.tsv"), newline="") as f:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                next(reader)
                dev = [(row[1], row[2], labels[row[3]]) for row in reader]
        return train, dev
    from datasets import load_dataset  # users with internet

    ds = load_dataset("glue", task)
    keys = ("premise", "hypothesis") if task == "mnli" else ("question", "sentence")
    split = "validation_matched" if task == "mnli" else "validation"
    conv = lambda part: [(r[keys[0]], r[keys[1]], int(r["label"])) for r in part]  # noqa: E731
    return conv(ds["train"]), conv(ds[split])


TASKS = ("sst2", *LABELS)


def read_glue(task: str, data_dir: str | None):
    """(train, dev) rows of ``task``: (sentence, label) for SST-2, (text_a, text_b, label) for QNLI/MNLI."""
    return read_sst2(data_dir) if task == "sst2" else read_task(task, data_dir)


def num_labels(task: str) -> int:
    return len(LABELS[task]) if task in LABELS else 2


def load_tokenizer(model: str | None, data_dir: str | None):
    if model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    from transformers import BertTokenizerFast

    path = os.path.join(data_dir or "", "tokenizers", "bert-base-uncased")
    # from_pretrained(<folder with vocab.txt>) works on transformers 4.x and 5.x alike. (On 5.x the constructor
    # silently ignores `vocab_file=` and builds a 5-token vocabulary that maps every word to [UNK].)
    tokenizer = BertTokenizerFast.from_pretrained(path if os.path.isfile(os.path.join(path, "vocab.txt")) else "bert-base-uncased")
    if len(tokenizer) < 1000:
        raise RuntimeError(f"the tokenizer loaded from {path!r} has only {len(tokenizer)} tokens: vocabulary not loaded")
    return tokenizer


def build_model(args, tokenizer, labels: int = 2):
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    if args.model:
        return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=labels)
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
        num_labels=labels,
    )
    return RobertaForSequenceClassification(config)


class Encoded(Dataset):
    """Rows of (sentence, label) or of (text_a, text_b, label), tokenized once and padded to ``max_length``."""

    def __init__(self, rows, tokenizer, max_length):
        texts = [r[:-1] for r in rows]
        pairs = len(texts[0]) == 2
        enc = tokenizer([t[0] for t in texts], [t[1] for t in texts] if pairs else None, truncation=True,
                        max_length=max_length, padding="max_length", return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.labels = torch.tensor([r[-1] for r in rows])

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
    def __init__(self, model, lr: float, num_classes: int = 2, average: str = "macro"):
        super().__init__()
        self.model = model
        self.lr = lr
        self.dev_accuracy = MulticlassAccuracy(num_classes=num_classes, average=average)

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
    p.add_argument("--task", choices=TASKS, default="sst2", help="GLUE task (qnli/mnli: sentence pairs)")
    p.add_argument("--model", default=None, help="Hugging Face model name or path (default: small model from config)")
    p.add_argument("--trainable", choices=["all", "head", "lora"], default="head",
                   help="what DPZero perturbs and updates (default: the classification head)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="use the first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="evaluate on the first N dev examples (0: all 872)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="σ instead of --eps (ε is then reported; 0 with a huge --clip is non-private MeZO)")
    p.add_argument("--clip", type=float, default=2.0, help="C: near the typical per-example |s_i|")
    p.add_argument("--zo-eps", type=float, default=1e-3, help="λ, the finite-difference step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-directions", type=int, default=1, help="q directions per step (σ is √q times larger at the same ε)")
    p.add_argument("--stages", type=int, default=0, help="stagewise schedule with this many stages (0: off)")
    p.add_argument("--lr-decay", type=float, default=0.5, help="learning-rate factor per stage")
    p.add_argument("--zo-eps-end", type=float, default=None, help="λ of the last stage (default: --zo-eps)")
    p.add_argument("--prox", type=float, default=0.0, help="γ of the proximal pull toward each stage's start")
    p.add_argument("--prune", type=float, default=0.0, help="train only this fraction of coordinates (0: all)")
    p.add_argument("--prune-score", choices=["zo_hessian", "magnitude"], default="zo_hessian")
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_rows, dev_rows = read_glue(args.task, args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.dev_size:
        dev_rows = dev_rows[: args.dev_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    model = select_trainable(build_model(args, tokenizer, num_labels(args.task)), args.trainable)
    module = SentimentClassifier(model, args.lr, num_labels(args.task))
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size, collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    privacy = {"eps": args.eps} if args.noise_multiplier is None else {"noise_multiplier": args.noise_multiplier}
    strategy = DPZeroStrategy(**privacy, delta=args.delta, clip=args.clip, zo_eps=args.zo_eps,
                              num_directions=args.num_directions)
    callbacks = [PrivacyBudget(log_every_n_steps=50)]
    if args.prune:
        callbacks.append(ZOPruning(trainable_fraction=args.prune, score=args.prune_score))
    if args.stages:
        callbacks.append(StagewiseZO(stages=args.stages, lr_decay=args.lr_decay, zo_eps_end=args.zo_eps_end,
                                     prox=args.prox))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=min(args.val_every, args.max_steps),
        check_val_every_n_epoch=None,
        callbacks=callbacks,
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
    return result, report


if __name__ == "__main__":
    main()
