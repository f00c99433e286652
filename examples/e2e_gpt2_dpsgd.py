"""Private table-to-text generation: a GPT-2-style LM trained with DP-SGD (AdamW) on E2E, test-set perplexity.

    python examples/e2e_gpt2_dpsgd.py                  # defaults: small GPT-2 from a config, a few minutes on CPU
    python examples/e2e_gpt2_dpsgd.py --eps 3 --max-steps 300 --batch-size 64 --test-size 0
    python examples/e2e_gpt2_dpsgd.py --model gpt2 --accelerator gpu --batch-size 256 --lr 2e-4   # real weights

Data: ``--data-dir`` (default ``../shared/data`` beside the repository when it exists) holds ``e2e/devset.csv`` and
``e2e/testset_w_refs.csv`` (header ``mr,ref``) and the GPT-2 tokenizer ``tokenizers/gpt2``. The official E2E
training set is not there, so the model trains on the dev set (4,672 rows) and is evaluated on the test set
(``--test-size`` rows). Each example is ``"<mr> || <ref><|endoftext|>"``; its loss is the mean token cross-entropy
over the reference tokens (and the end-of-text token), the meaning representation being the prompt.

Without ``--model`` the LM is built from a ``GPT2Config`` (random weights) with untied input and output embeddings
(``--tie`` ties them as GPT-2 does; DP-SGD then instantiates the per-example gradient of the tied ``[V, d]`` matrix,
``B × V × d`` floats per step). ``--model NAME_OR_PATH`` loads a Hugging Face causal LM and its tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_dp import DPSGDStrategy, PrivacyBudget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
IGNORE = -100


def read_e2e(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["mr"].strip(), row["ref"].strip()) for row in csv.DictReader(f)]


def load_tokenizer(model: str | None, data_dir: str | None):
    if model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    from transformers import GPT2TokenizerFast

    path = os.path.join(data_dir or "", "tokenizers", "gpt2")
    if not os.path.isfile(os.path.join(path, "vocab.json")):
        raise SystemExit(f"no GPT-2 tokenizer in {path!r}: pass --data-dir (a folder with tokenizers/gpt2/)")
    tokenizer = GPT2TokenizerFast.from_pretrained(path)
    if len(tokenizer) < 50000:
        raise RuntimeError(f"the tokenizer loaded from {path!r} has only {len(tokenizer)} tokens")
    return tokenizer


def build_model(args, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.max_length,
        n_embd=args.n_embd,
        n_layer=args.layers,
        n_head=max(1, args.n_embd // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=args.tie,
    )
    return GPT2LMHeadModel(config)


class E2EDataset(Dataset):
    """``input_ids`` = tokens of ``"<mr> ||"`` + tokens of ``" <ref>"`` + EOS, right-padded with EOS (masked);
    ``labels`` = the input ids on the reference and EOS, ``-100`` elsewhere."""

    def __init__(self, rows, tokenizer, max_length):
        eos = tokenizer.eos_token_id
        prompts = tokenizer([mr + " ||" for mr, _ in rows])["input_ids"]
        targets = tokenizer([" " + ref for _, ref in rows])["input_ids"]
        n = len(rows)
        self.input_ids = torch.full((n, max_length), eos, dtype=torch.long)
        self.attention_mask = torch.zeros(n, max_length, dtype=torch.long)
        self.labels = torch.full((n, max_length), IGNORE, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            ids = (p + t + [eos])[:max_length]
            self.input_ids[i, : len(ids)] = torch.tensor(ids)
            self.attention_mask[i, : len(ids)] = 1
            self.labels[i, len(p): len(ids)] = torch.tensor(ids[len(p):], dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def collate(samples):
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    width = int(batch["attention_mask"].sum(1).max())  # trim padding to the longest sequence of the batch
    return {k: v[:, :width] for k, v in batch.items()}


class E2ELM(L.LightningModule):
    def __init__(self, model, lr: float, weight_decay: float):
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self._nll = 0.0
        self._tokens = 0

    def token_losses(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        tok = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        return tok, (target != IGNORE).float()

    def training_step(self, batch, batch_idx):
        tok, keep = self.token_losses(batch)
        per_example = (tok * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # the DP contract: one loss per sequence
        return {"loss": per_example.mean(), "per_sample_loss": per_example}

    def on_validation_epoch_start(self):
        self._nll, self._tokens = 0.0, 0

    def validation_step(self, batch, batch_idx):
        tok, keep = self.token_losses(batch)
        self._nll += float((tok * keep).sum())
        self._tokens += int(keep.sum())

    def on_validation_epoch_end(self):
        nll = torch.tensor([self._nll, float(self._tokens)], device=self.device)
        nll = self.all_gather(nll).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else nll
        self.log("test_ppl", math.exp(float(nll[0] / nll[1].clamp(min=1.0))), prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=self.weight_decay)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--model", default=None, help="Hugging Face causal LM name or path (default: GPT-2 from config)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings (config model)")
    p.add_argument("--max-length", type=int, default=80)
    p.add_argument("--train-size", type=int, default=0, help="use the first N rows of devset.csv (0: all 4,672)")
    p.add_argument("--test-size", type=int, default=200, help="evaluate on the first N test rows (0: all 4,693)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--clipping", choices=["auto", "bk", "ghost"], default="auto",
                   help="bk: one backward (fastest); ghost: two backwards at the memory of non-private training "
                        "(the tied wte/lm_head per-example gradients are instantiated in both)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32, help="expected batch size (Poisson sampling)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.data_dir:
        raise SystemExit("--data-dir is required (a folder with e2e/ and tokenizers/gpt2/)")

    L.seed_everything(args.seed, verbose=False)
    train_rows = read_e2e(os.path.join(args.data_dir, "e2e", "devset.csv"))
    test_rows = read_e2e(os.path.join(args.data_dir, "e2e", "testset_w_refs.csv"))
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.test_size:
        test_rows = test_rows[: args.test_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    module = E2ELM(build_model(args, tokenizer), args.lr, args.weight_decay)
    train = DataLoader(E2EDataset(train_rows, tokenizer, args.max_length), batch_size=args.batch_size,
                       collate_fn=collate)
    test = DataLoader(E2EDataset(test_rows, tokenizer, args.max_length), batch_size=64, collate_fn=collate)

    strategy = DPSGDStrategy(eps=args.eps, delta=args.delta, clip=args.clip, clipping=args.clipping)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        callbacks=[PrivacyBudget(log_every_n_steps=25)],
        enable_checkpointing=False,
        log_every_n_steps=25,
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainer.is_global_zero:
        print(f"E2E: {len(train_rows)} train (devset) / {len(test_rows)} test rows; "
              f"{n_trainable / 1e6:.2f}M trainable parameters")
    start = time.time()
    trainer.fit(module, train)
    result = trainer.validate(module, test, verbose=False)[0]
    report = strategy.privacy_report()
    if trainer.is_global_zero:
        print(
            f"test perplexity {result['test_ppl']:.2f} | ε = {report['epsilon']:.3f} (target "
            f"{report['target_epsilon']}) at δ = {report['delta']:.2e} | σ = {report['noise_multiplier']:.3f}, "
            f"q = {report['sample_rate']:.2e}, {report['steps']} steps, C = {report['clip']} | "
            f"{time.time() - start:.0f} s"
        )
    return result, report


if __name__ == "__main__":
    main()
