"""Private table-to-text generation: a GPT-2-style LM trained with DP-SGD (AdamW) on E2E, test-set perplexity.

    python examples/e2e_gpt2_dpsgd.py                  # configs/e2e_gpt2_dpsgd.yaml: a small GPT-2 from a config
    python examples/e2e_gpt2_dpsgd.py --trainer.strategy.eps 3 --trainer.max_steps 300 --data.batch_size 64
    python examples/e2e_gpt2_dpsgd.py --model.model_name gpt2 --trainer.accelerator gpu --data.batch_size 256 \
        --model.lr 2e-4                                # real weights (internet, or a local path)
    python examples/e2e_gpt2_dpsgd.py --ckpt_path last # resume from checkpoints/e2e_gpt2_dpsgd/last.ckpt

Data: ``--data.data_dir`` (default ``../shared/data``) holds ``e2e/devset.csv``, ``e2e/testset_w_refs.csv`` and the
GPT-2 tokenizer ``tokenizers/gpt2``. The model trains on the dev set (the official training set is not there) and is
evaluated on the test set. Each example is ``"<mr> || <ref><|endoftext|>"``; its loss
(``lightning_dp.losses.causal_lm``) averages the token cross-entropy over its own reference and end-of-text tokens
(the meaning representation is the prompt, labelled -100). Without ``model.model_name`` the LM is a GPT-2 from a
config with untied embeddings (``model.tie`` ties them; DP-SGD then holds a ``B × V × d`` per-example gradient of
the tied matrix).
"""

from __future__ import annotations

import csv
import os
import time

import lightning.pytorch as L
import torch
from glue_common import DEFAULT_DATA, ExampleCLI, make_cli
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from lightning_dp import losses

IGNORE = -100


def read_e2e(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["mr"].strip(), row["ref"].strip()) for row in csv.DictReader(f)]


def load_tokenizer(model_name: str | None, data_dir: str | None):
    """The tokenizer of ``model_name``, else the GPT-2 tokenizer in ``data_dir/tokenizers/gpt2``; pads with EOS.

    Raises:
        FileNotFoundError: no GPT-2 tokenizer in ``data_dir``."""
    from transformers import AutoTokenizer

    path = model_name or os.path.join(data_dir or "", "tokenizers", "gpt2")
    if not model_name and not os.path.isfile(os.path.join(path, "vocab.json")):
        raise FileNotFoundError(f"no GPT-2 tokenizer in {path!r}: pass --data.data_dir (a folder with "
                                "tokenizers/gpt2/)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(rows, tokenizer, max_length: int) -> list[dict]:
    """``input_ids`` = tokens of ``"<mr> ||"`` + tokens of ``" <ref>"`` + EOS; ``labels`` = -100 on the prompt."""
    prompts = tokenizer([mr + " ||" for mr, _ in rows])["input_ids"]
    targets = tokenizer([" " + ref for _, ref in rows])["input_ids"]
    out = []
    for p, t in zip(prompts, targets):
        ids = (p + t + [tokenizer.eos_token_id])[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [IGNORE] * min(len(p), len(ids)) + ids[len(p):]})
    return out


class E2EData(L.LightningDataModule):
    """E2E: train on ``devset.csv``, evaluate on ``testset_w_refs.csv``.

    Args:
        data_dir: a folder with ``e2e/`` and ``tokenizers/gpt2/``.
        model_name: linked from ``model.model_name`` (its tokenizer replaces the GPT-2 one).
        max_length: truncation length in tokens.
        train_size: the first N training rows (0: all).
        test_size: the first N test rows (0: all).
        batch_size: the expected batch size of Poisson sampling (per rank).
        eval_batch_size: batch size of the evaluation.
    """

    def __init__(self, data_dir: str | None = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None,
                 model_name: str | None = None, max_length: int = 80, train_size: int = 0, test_size: int = 200,
                 batch_size: int = 32, eval_batch_size: int = 16):
        super().__init__()
        self.data_dir, self.max_length, self.train_size, self.test_size = data_dir, max_length, train_size, test_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tokenizer = load_tokenizer(model_name, data_dir)
        self.train_set = self.test_set = None

    def setup(self, stage: str) -> None:
        from transformers import DataCollatorForSeq2Seq

        if self.train_set is None:
            train = read_e2e(os.path.join(self.data_dir, "e2e", "devset.csv"))[: self.train_size or None]
            test = read_e2e(os.path.join(self.data_dir, "e2e", "testset_w_refs.csv"))[: self.test_size or None]
            self.train_set = encode(train, self.tokenizer, self.max_length)
            self.test_set = encode(test, self.tokenizer, self.max_length)
            self.collate = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, collate_fn=self.collate)


class E2ELM(L.LightningModule):
    """A causal LM whose ``training_step`` returns one loss per sequence (the DP contract).

    Args:
        model_name: a Hugging Face causal LM name or path; ``None``: GPT-2 from a config (random weights).
        vocab_size: linked from the data's tokenizer.
        eos_token_id: linked from the data's tokenizer.
        n_positions: linked from ``data.max_length``.
        n_embd: width of the config model.
        layers: layers of the config model.
        tie: tie the config model's input and output embeddings.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, model_name: str | None = None, vocab_size: int = 50257, eos_token_id: int = 50256,
                 n_positions: int = 80, n_embd: int = 128, layers: int = 2, tie: bool = False, lr: float = 3e-3,
                 weight_decay: float = 0.0):
        super().__init__()
        from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

        self.save_hyperparameters()
        if model_name:
            self.model = AutoModelForCausalLM.from_pretrained(model_name)
        else:
            self.model = GPT2LMHeadModel(GPT2Config(
                vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=layers,
                n_head=max(1, n_embd // 64), bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                tie_word_embeddings=tie))
        self.test_ppl = Perplexity(ignore_index=IGNORE)

    def shifted(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1].float(), batch["labels"][:, 1:]

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return losses.causal_lm(out.logits, batch["labels"], ignore_index=IGNORE)  # one loss per sequence

    def validation_step(self, batch, batch_idx):
        self.test_ppl.update(*self.shifted(batch))
        self.log("test_ppl", self.test_ppl, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)


class E2ECLI(ExampleCLI):
    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("data.max_length", "model.n_positions")
        parser.link_arguments("data", "model.vocab_size", compute_fn=lambda d: len(d.tokenizer), apply_on="instantiate")
        parser.link_arguments("data", "model.eos_token_id", compute_fn=lambda d: d.tokenizer.eos_token_id,
                              apply_on="instantiate")


def main(args=None):
    """Run the example with ``args`` (a list of CLI flags; ``None``: ``sys.argv``). Returns ``(result, report)``."""
    start = time.time()
    cli = make_cli("e2e_gpt2_dpsgd.yaml", args, model_class=E2ELM, datamodule_class=E2EData, cli_class=E2ECLI)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    data.setup("fit")
    if trainer.is_global_zero:
        n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"E2E: {len(data.train_set)} train (devset) / {len(data.test_set)} test rows; "
              f"{n_trainable / 1e6:.2f}M trainable parameters", flush=True)
    trainer.fit(module, datamodule=data, ckpt_path=cli.config.ckpt_path)
    result = trainer.validate(module, datamodule=data, verbose=False)[0]
    report = trainer.strategy.privacy_report()
    if trainer.is_global_zero:
        print(f"test perplexity {result['test_ppl']:.2f} | ε = {report['epsilon']:.3f} (target "
              f"{report['target_epsilon']}) at δ = {report['delta']:.2e} | σ = {report['noise_multiplier']:.3f}, "
              f"q = {report['sample_rate']:.2e}, {report['steps']} steps, C = {report['clip']} | "
              f"{time.time() - start:.0f} s", flush=True)
    return result, report


if __name__ == "__main__":
    main()
