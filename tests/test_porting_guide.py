"""The porting guide, run: a plain Hugging Face + Lightning project trains with differential privacy after two
changes, returning ``losses.from_hf_output(out, batch, model=self.model)`` and choosing the strategy (plus, for
DPZero, plain SGD as the optimizer)."""

import math
import warnings

import lightning.pytorch as L
import pytest
import torch
from helpers import run_dir
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from lightning_dp import DPSGDStrategy, DPZeroStrategy, losses
from lightning_dp.errors import UnsafeSettingError
from lightning_dp.mechanisms.per_sample import PerSampleLossError

transformers = pytest.importorskip("transformers")

VOCAB, SEQ_LEN, NUM_LABELS = 50, 12, 2


# ------------------------------------------------------------------------------------ the user's project, as it is
class RandomTokens(Dataset):
    """Tokenizer-free stand-in for a tokenized dataset: dicts of padded ids, attention mask and labels."""

    def __init__(self, task: str, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
        lengths = torch.randint(4, SEQ_LEN + 1, (n,), generator=g)
        self.mask = (torch.arange(SEQ_LEN) < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # pad id 0
        if task == "classification":
            self.labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
        else:  # causal LM: predict the next token, no target on padding
            self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TokensDataModule(L.LightningDataModule):
    def __init__(self, task: str, batch_size: int = 8):
        super().__init__()
        self.task = task
        self.batch_size = batch_size

    def setup(self, stage: str):
        self.train_set = RandomTokens(self.task)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class HFModule(L.LightningModule):
    """A Hugging Face model fine-tuned with AdamW and a linear warmup, as it is written without DP.

    ``private`` switches the one line the porting guide changes; ``zeroth_order`` the one extra line for DPZero.
    """

    def __init__(self, model, lr: float = 1e-3, warmup_steps: int = 2, private: bool = True,
                 zeroth_order: bool = False):
        super().__init__()
        self.model = model
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.private = private
        self.zeroth_order = zeroth_order

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        if not self.private:
            return out.loss  # before: Hugging Face's batch-averaged loss
        return losses.from_hf_output(out, batch, model=self.model)  # after: one loss per example

    def configure_optimizers(self):
        if self.zeroth_order:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)  # DPZero: plain SGD, no momentum
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def bert_classifier():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=SEQ_LEN, num_labels=NUM_LABELS)
    return transformers.BertForSequenceClassification(cfg)


def gpt2_lm():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


# ------------------------------------------------------------------------------------------------------- the runs
def fit(module, task, strategy="auto"):
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on DataLoader workers
        trainer.fit(module, datamodule=TokensDataModule(task))
    return trainer


def check_private_training(module, task, strategy):
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, task, strategy)
    assert trainer.global_step == 3
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()) if p.requires_grad]
    assert all(moved), f"{moved.count(False)} trainable tensors did not move"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    batch = next(iter(DataLoader(RandomTokens(task, seed=1), batch_size=8)))
    with torch.no_grad():
        per_example = losses.from_hf_output(module.model(**batch), batch, model=module.model)
    assert per_example.shape == (8,) and torch.isfinite(per_example).all()
    report = trainer.strategy.privacy_report()
    assert report["steps"] == 3 and 0 < report["epsilon"] <= 8 and math.isfinite(report["epsilon"])


def test_the_unported_module_trains_without_dp_and_is_refused_by_dp():
    torch.manual_seed(0)
    fit(HFModule(bert_classifier(), private=False), "classification")  # the user's project works as it is
    with pytest.raises(PerSampleLossError, match="expected \\[B\\]"):
        fit(HFModule(bert_classifier(), private=False), "classification", DPSGDStrategy(eps=8, accountant="rdp"))


def test_bert_classifier_with_dpsgd():
    torch.manual_seed(0)
    check_private_training(HFModule(bert_classifier()), "classification", DPSGDStrategy(eps=8))


def test_bert_classifier_with_dpzero():
    torch.manual_seed(0)
    with pytest.raises(UnsafeSettingError, match="must therefore be `torch.optim.SGD`"):
        fit(HFModule(bert_classifier()), "classification", DPZeroStrategy(eps=8, accountant="rdp"))  # AdamW
    # accountant="rdp" only keeps the test short (calibrating the default PRV accountant takes seconds on a CPU)
    strategy = DPZeroStrategy(eps=8, accountant="rdp")
    check_private_training(HFModule(bert_classifier(), zeroth_order=True), "classification", strategy)


def test_gpt2_causal_lm_with_dpsgd():
    torch.manual_seed(0)
    check_private_training(HFModule(gpt2_lm()), "causal_lm", DPSGDStrategy(eps=8, accountant="rdp"))


def test_bert_classifier_with_federated_dp_lora():
    """The same ported module under the federated strategy: the strategy injects the LoRA adapters (the module is
    unchanged), only they (and the classifier head, as peft's `modules_to_save`) train; the base stays frozen."""
    from peft import LoraConfig

    from lightning_dp import DPLoRAFederatedStrategy

    module = HFModule(bert_classifier())
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    strategy = DPLoRAFederatedStrategy(eps=8, accountant="rdp", clients=2, rounds=2, lora=lora)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=TokensDataModule("classification"))
    report = strategy.privacy_report()
    assert 0 < report["epsilon"] <= 8 and math.isfinite(report["epsilon"])
    after = dict(module.named_parameters())
    lora_b = [p for n, p in after.items() if "lora_B" in n]  # peft starts every B factor at exactly 0
    assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b), "the adapters did not train"
    for name, before in base.items():  # the base model never moves
        if name in after and not after[name].requires_grad:
            assert torch.equal(before, after[name].detach()), name
