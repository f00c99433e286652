"""Book-keeping DP-SGD on tiny transformers built from configs, against a per-example autograd loop (σ = 0)."""

import pytest
import torch
import torch.nn.functional as F
from test_dpsgd_mechanism import check_against_reference

transformers = pytest.importorskip("transformers")

B, T, V = 6, 7, 40


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, T), generator=g)


def lm_loss(ids, mask=None):
    def loss(m):
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        if mask is None:
            return tok.mean(1)
        keep = mask[:, 1:].float()
        return (tok * keep).sum(1) / keep.sum(1)

    return loss


def test_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    check_against_reference(
        model, lambda m: F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y, reduction="none"), B
    )


def test_gpt2_tied_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    check_against_reference(model, lm_loss(_ids(1)), B)


def test_llama_rmsnorm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)  # norm weights away from 1, so their gradients matter
    check_against_reference(model, lm_loss(_ids(2)), B)


def test_peft_lora_only_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would make A's gradient vanish
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    check_against_reference(model, lm_loss(_ids(3)), B)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gpt2_lightning_module_trains(precision):
    import warnings

    import lightning.pytorch as L
    from helpers import trainer_kwargs
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_dp import DPSGDStrategy

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)
            self.model = GPT2LMHeadModel(cfg)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self.model(input_ids=ids).logits[:, :-1]
            return F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, V, (32, T)))
    module = LM()
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    strategy = DPSGDStrategy(noise_multiplier=1.0, clip=1.0)
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=3, precision=precision))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=8))
    after = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert strategy.accountant.steps == 3 and not torch.equal(before, after)
