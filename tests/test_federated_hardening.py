"""Privacy hardening of DPLoRAFederatedStrategy: what is logged, reported and checkpointed stays data-independent,
every trainable tensor is privatized, per-step invariants, data-dependent buffers, the per-example contract of the
optional example-level DP-SGD, and non-finite client updates. Small models, one process."""

import glob
import importlib.util
import json
import math
import os

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import linear_data, loader, trainer_kwargs
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.mechanisms.federated import clip_update, privatize_upload
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.mechanisms.per_sample import PerSampleLossError
from lightning_dp.strategies.base import UnsafeSettingError
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_federated.py")
_spec = importlib.util.spec_from_file_location("ddp_federated_hardening", SCRIPT)
ddp_federated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_federated)

UNEVEN = [list(range(0, 10)), list(range(10, 24)), list(range(24, 42)), list(range(42, 64))]  # 10, 14, 18, 22


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"])


def fit(strategy, model=None, data=None, batch_size=8, **trainer_overrides):
    model = model or ddp_federated.Net()
    kw = trainer_kwargs(max_steps=-1, max_epochs=None)
    kw.update(trainer_overrides)
    trainer = L.Trainer(strategy=strategy, **kw)
    train = data if isinstance(data, (DataLoader, list)) else loader(
        data if data is not None else linear_data(n=64), batch_size)
    trainer.fit(model, train)
    return model, trainer


def strategy(**kw):
    args = {"noise_multiplier": 0.5, "clip": 0.1, "rounds": 2, "clients": 2, "lora": lora(), "accountant": "rdp"}
    args.update(kw)
    return DPLoRAFederatedStrategy(**args)


def _keys(obj):
    """Every key of nested dicts/lists (the report and its JSON)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _keys(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _keys(v)


class CaptureLogger(Logger):
    """Keeps everything Lightning hands to a logger."""

    def __init__(self):
        super().__init__()
        self.metrics, self.hparams = [], []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.append(params)


# ---------------------------------------------------------------------------------------------- 1. metadata
SECRET_WORDS = ("sampled", "shard", "particip")


def test_sampling_metadata_not_logged_nor_reported(tmp_path):
    """Client sampling (q=0.5, seed 24: client participation counts [1, 3, 2, 2], sampled per round [1, 2, 3, 2])
    and uneven shards: nothing that the loggers, ``privacy_report()`` or the PrivacyBudget JSON receive names the
    sampled clients, their number, shard sizes or participation counts; the local and example-level ε are the
    data-independent worst cases (a client in every round, the smallest non-empty shard)."""
    from opacus.accountants import RDPAccountant

    from lightning_dp.callbacks.budget import PrivacyBudget

    sigma, sigma_ex, rounds, bs = 1.0, 1.5, 4, 8
    s = strategy(noise_multiplier=sigma, rounds=rounds, clients=4, client_fraction=0.5, partition=UNEVEN,
                 sampling_seed=24, example_noise_multiplier=sigma_ex, example_clip=1.0)
    logger = CaptureLogger()
    report_path = tmp_path / "report.json"
    fit(s, batch_size=bs, logger=logger, log_every_n_steps=1,
        callbacks=[PrivacyBudget(report_path=str(report_path), log_every_n_steps=1)])
    report = s.privacy_report()
    saved = json.load(open(report_path))
    logged = [k for m in logger.metrics for k in m] + [k for h in logger.hparams for k in _keys(dict(h))]
    assert any(k.startswith("federated/") for k in logged)  # the logger did receive the round metrics
    federated = {k for k in logged if k.startswith("federated/")}
    assert federated <= {"federated/round", "federated/upload_bytes_per_round", "federated/full_model_bytes_per_round"}
    for keys in (logged, list(_keys(report)), list(_keys(saved))):
        leaked = [k for k in keys if any(w in k.lower() for w in SECRET_WORDS)]
        assert not leaked, leaked
    assert not hasattr(s, "round_log") and not hasattr(s, "shard_sizes")  # no public per-client record
    # worst cases: a client sampled in every completed round; the smallest non-empty shard (10) for examples
    local = RDPAccountant()
    local.history = [(sigma / 2, 1.0, rounds)]
    assert report["local_epsilon"] == pytest.approx(local.get_epsilon(report["delta"]))
    example = RDPAccountant()
    example.history = [(sigma_ex, bs / 10, rounds)]
    assert report["example_level"]["epsilon"] == pytest.approx(example.get_epsilon(report["example_level"]["delta"]))
    assert saved["local_epsilon"] == pytest.approx(report["local_epsilon"])


# ---------------------------------------------------------------------------------------------- 2. secret seed
def _contains(obj, seed, text, depth=0):
    if depth > 20:
        return False
    if isinstance(obj, bool):
        return False
    if isinstance(obj, int):
        return obj == seed
    if isinstance(obj, float):
        return obj == float(seed)
    if isinstance(obj, (str, bytes)):
        return text in (obj if isinstance(obj, str) else obj.decode("latin-1"))
    if isinstance(obj, torch.Tensor):
        return obj.numel() == 1 and obj.dtype in (torch.int64, torch.float64) and int(obj.item()) == seed
    if isinstance(obj, dict):
        return any(_contains(k, seed, text, depth + 1) or _contains(v, seed, text, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains(v, seed, text, depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return _contains(vars(obj), seed, text, depth + 1)
    return False


def test_drawn_sampling_seed_never_checkpointed_nor_reported(tmp_path):
    s = strategy()  # sampling_seed drawn from OS entropy
    _, trainer = fit(s, enable_checkpointing=True, default_root_dir=str(tmp_path))
    seed = s.sampling_seed
    assert isinstance(seed, int) and seed.bit_length() > 32
    trainer.save_checkpoint(str(tmp_path / "manual.ckpt"))
    files = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert len(files) >= 2  # ModelCheckpoint's and the manual one
    pickled = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)  # pickle's LONG1 payload
    for path in files:
        ckpt = torch.load(path, weights_only=False)
        assert "lightning_dp" in ckpt  # the DP state is saved ...
        assert not _contains(ckpt, seed, str(seed)), path  # ... without the secret seed, nowhere in the checkpoint
        raw = open(path, "rb").read()
        assert pickled not in raw and str(seed).encode() not in raw
    assert not _contains(s.privacy_report(), seed, str(seed))
    # a seed the user passed explicitly (tests, reproductions) may be saved: it is not a secret drawn by the run
    s = strategy(sampling_seed=5)
    _, trainer = fit(s)
    trainer.save_checkpoint(str(tmp_path / "explicit.ckpt"))
    assert torch.load(str(tmp_path / "explicit.ckpt"), weights_only=False)["lightning_dp"]["seed"] == s.seed


# ---------------------------------------------------------------------------------------------- 3. trainable set
class Unfreeze(L.Callback):
    """At round 1, a base weight becomes trainable (as ``BackboneFinetuning`` does), optionally in the optimizer."""

    def __init__(self, mode):
        self.mode = mode

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        if self.mode == "optimizer_only":
            trainer.optimizers[0].add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.1})
            return
        w = pl_module.fc1.base_layer.weight
        w.requires_grad_(True)
        if self.mode == "module_and_optimizer":
            trainer.optimizers[0].add_param_group({"params": [w], "lr": 0.1})


@pytest.mark.parametrize("mode", ["module_and_optimizer", "module_only", "optimizer_only"])
def test_parameter_made_trainable_after_setup_is_refused(mode):
    torch.manual_seed(0)
    model = ddp_federated.Net()
    base = model.fc1.weight.detach().clone()
    s = strategy(rounds=3, sampling_seed=1)
    rec = ddp_federated.RoundRecorder()
    with pytest.raises(UnsafeSettingError, match="fc1.base_layer.weight" if mode != "optimizer_only" else "optimizer"):
        fit(s, model, callbacks=[Unfreeze(mode), rec])
    assert torch.equal(model.fc1.base_layer.weight, base)  # never trained on raw data
    assert s.rounds_completed == 1 and torch.equal(s._global, rec.globals[-1])  # nothing of round 1 released


class BackboneNet(L.LightningModule):
    """A ``backbone`` for Lightning's ``BackboneFinetuning`` (frozen at setup, unfrozen and added to the optimizer
    at epoch 1) and a head; LoRA on both."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_backbone_finetuning_is_refused_when_it_unfreezes():
    from lightning.pytorch.callbacks import BackboneFinetuning
    from peft import LoraConfig

    torch.manual_seed(0)
    model = BackboneNet()
    base = model.backbone[0].weight.detach().clone()
    s = strategy(rounds=3, sampling_seed=1, lora=LoraConfig(r=2, target_modules=["backbone.0", "head"]))
    with pytest.raises(UnsafeSettingError, match=r"backbone\.0\.base_layer\.weight"):
        fit(s, model, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    assert torch.equal(model.backbone[0].base_layer.weight, base) and s.rounds_completed == 1


# ---------------------------------------------------------------------------------------------- 4. step invariants
def test_gradient_accumulation_scheduler_is_refused_before_any_release():
    s = strategy(rounds=3, sampling_seed=1)
    rec = ddp_federated.RoundRecorder()
    with pytest.raises(UnsafeSettingError, match="GradientAccumulationScheduler"):
        fit(s, callbacks=[GradientAccumulationScheduler({1: 2}), rec])
    assert s.rounds_completed == 0


class AccumulateFrom(L.Callback):
    """Changes ``accumulate_grad_batches`` at a round start (as a scheduler the setup check does not know would)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.accumulate_grad_batches = 2


def test_gradient_accumulation_changed_after_setup_is_refused_before_the_round_is_released():
    s = strategy(rounds=3, sampling_seed=1)
    rec = ddp_federated.RoundRecorder()
    with pytest.raises(UnsafeSettingError, match="accumulate_grad_batches"):
        fit(s, callbacks=[AccumulateFrom(), rec])
    assert s.rounds_completed == 1 and len(rec.globals) == 2  # round 0 released, nothing of round 1
    assert torch.equal(s._global, rec.globals[-1]) and torch.equal(s.adapters.read(), rec.globals[-1])


def test_several_training_dataloaders_are_refused():
    s = strategy(sampling_seed=1)
    with pytest.raises(UnsafeSettingError, match="one training dataloader"):
        fit(s, data=[loader(linear_data(n=64), 8), loader(linear_data(n=64, seed=1), 8)])
    assert s.rounds_completed == 0


# ---------------------------------------------------------------------------------------------- 5. buffers
class InstanceNormNet(ddp_federated.Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm1d(1, track_running_stats=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self.norm(x.unsqueeze(1)).squeeze(1)
        return super().training_step((x, y), batch_idx)


def test_instance_norm_with_running_stats_refused_at_setup():
    with pytest.raises(UnsafeSettingError, match=r"norm \(InstanceNorm1d\).*track_running_stats=False"):
        fit(strategy(sampling_seed=1), InstanceNormNet())


class Tally(nn.Module):
    """Writes a statistic of its input into a buffer in forward (no static check can know)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(8))

    def forward(self, x):
        self.seen.add_(x.detach().mean(0))
        return x


class TallyNet(ddp_federated.Net):
    def __init__(self):
        super().__init__()
        self.tally = Tally()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((self.tally(x), y), batch_idx)


def test_buffer_written_in_forward_refused_before_the_upload():
    model = TallyNet()
    s = strategy(sampling_seed=1)
    rec = ddp_federated.RoundRecorder()
    with pytest.raises(UnsafeSettingError, match="tally.seen"):
        fit(s, model, callbacks=[rec])
    assert s.rounds_completed == 0 and torch.equal(s._global, rec.globals[0])  # no upload left the client
    assert torch.equal(model.tally.seen, torch.zeros(8))  # the data-dependent value is not left in the model


# ---------------------------------------------------------------------------------------------- 6. per-example
class TokenNet(ddp_federated.Net):
    """Batches of B sequences of T=3 tokens; labels come flattened ``[B·T]`` (tensors disagree on dim 0)."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch["x"], batch["y"]
        b, t, _ = x.shape
        if self.per_token:  # per-token model: [B·T, d] in, one loss per token out
            return F.cross_entropy(self.fc2(torch.tanh(self.fc1(x.reshape(b * t, 8)))), y, reduction="none")
        losses = F.cross_entropy(self.fc2(torch.tanh(self.fc1(x))).reshape(b * t, 2), y, reduction="none")
        return losses.view(b, t).mean(1)  # one loss per sequence: the contract


def _token_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, generator=g), torch.randint(0, 2, (64, 3), generator=g)

    def collate(samples):
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.cat([s[1] for s in samples])}

    return DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=collate)


def test_per_token_losses_refused_by_example_level_dpsgd():
    kw = {"sampling_seed": 3, "example_noise_multiplier": 1.0, "example_clip": 1.0}
    model, _ = fit(strategy(**kw), TokenNet(per_token=False), data=_token_loader())  # [B] losses: accepted
    assert model.calls > 0
    with pytest.raises(PerSampleLossError, match="examples"):
        fit(strategy(**kw), TokenNet(per_token=True), data=_token_loader())  # [B·T]: clipped per token otherwise


# ---------------------------------------------------------------------------------------------- 7. non-finite
def test_nonfinite_update_contributes_exactly_zero():
    noise = GaussianNoise(seed=0)
    for bad in (float("nan"), float("inf")):
        delta = torch.ones(10)
        delta[3] = bad
        clipped, norm = clip_update(delta, 1.0)
        assert not math.isfinite(norm)
        assert torch.equal(clipped, torch.zeros(10))  # factor 0, not 0·NaN
        upload, info = privatize_upload(delta, 1.0, 0.0, noise, participates=True)
        assert torch.equal(upload, torch.zeros(10)) and info.clipped_norm == 0.0
        upload, _ = privatize_upload(delta, 1.0, 0.5, noise, participates=True)
        assert torch.isfinite(upload).all()  # the noise alone
    clipped, _ = clip_update(torch.full((4,), 3.0), 1.0)  # finite updates are clipped as before
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)


def test_client_with_nan_data_does_not_poison_the_global_adapters():
    data = linear_data(n=64)
    x = data.tensors[0].clone()
    x[16:32] = float("nan")  # client 1's shard
    s = strategy(rounds=2, clients=4, partition=[list(range(i, i + 16)) for i in range(0, 64, 16)], sampling_seed=2)
    logger = CaptureLogger()
    model, _ = fit(s, data=TensorDataset(x, data.tensors[1]), logger=logger)
    assert s.nonfinite_updates == 2  # client 1 in both rounds (q=1); a non-private diagnostic ...
    assert torch.isfinite(s._global).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for keys in ([k for m in logger.metrics for k in m], list(_keys(s.privacy_report()))):
        assert not any("finite" in k for k in keys)  # ... never logged nor reported


# ---------------------------------------------------------------------------------------------- checkpoints
class MomentumNet(ddp_federated.Net):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class SaveMidClient(L.Callback):
    """Saves a checkpoint after a client's first local step (its adapters are then local, not yet released)."""

    def __init__(self, path):
        self.path, self.global_then = path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:  # round 1, client 0, after local step 0 of 2
            self.global_then = trainer.strategy._global.clone()
            assert not torch.equal(trainer.strategy.adapters.read(), self.global_then)
            trainer.save_checkpoint(self.path)


def test_checkpoint_holds_the_released_adapters_and_no_client_optimizer_state(tmp_path):
    """A checkpoint saved mid-round carries the global (released) adapters, not a client's local ones, and no
    optimizer state (a client's momentum is a sum of its raw gradients)."""
    path = str(tmp_path / "mid.ckpt")
    s = strategy(rounds=2, local_steps=2, sampling_seed=1)
    cb = SaveMidClient(path)
    model, trainer = fit(s, MomentumNet(), callbacks=[cb])
    ckpt = torch.load(path, weights_only=False)
    saved = torch.cat([ckpt["state_dict"][n].reshape(-1).float() for n in s.adapters.names])
    assert torch.equal(saved, cb.global_then)
    assert all(not opt["state"] for opt in ckpt["optimizer_states"])
    trainer.save_checkpoint(str(tmp_path / "end.ckpt"))  # at the end: the final global adapters
    end = torch.load(str(tmp_path / "end.ckpt"), weights_only=False)
    assert torch.equal(torch.cat([end["state_dict"][n].reshape(-1).float() for n in s.adapters.names]), s._global)
    assert all(not opt["state"] for opt in end["optimizer_states"])


# ---------------------------------------------------------------------------------------------- validation
def test_validation_mid_round_sees_the_global_adapters():
    """Validation inside a round (val_check_interval) evaluates the released global adapters, never a client's
    local, un-noised ones; training then continues from the client's local adapters."""
    seen, released = [], []

    class Net(ddp_federated.Net):
        def validation_step(self, batch, batch_idx):
            s = self.trainer.strategy
            seen.append(s.adapters.read().clone())
            released.append(s._global.clone())
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.fc2(torch.tanh(self.fc1(x))), y))

    s = strategy(rounds=2, local_steps=2, sampling_seed=1, noise_multiplier=0.0)
    trainer = L.Trainer(strategy=s, **{**trainer_kwargs(max_steps=-1, max_epochs=None),
                                      "val_check_interval": 1, "num_sanity_val_steps": 0})
    trainer.fit(Net(), loader(linear_data(n=64), 8), loader(linear_data(n=16, seed=3), 8))
    assert len(seen) >= 4 and any(not torch.equal(a, seen[0]) for a in seen)
    for a, b in zip(seen, released):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- constructor
def test_constructor_is_keyword_only_with_the_shared_arguments_first():
    import inspect

    params = list(inspect.signature(DPLoRAFederatedStrategy.__init__).parameters.values())[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)  # no positional, no **kwargs
    names = [p.name for p in params]
    assert names[:7] == ["eps", "delta", "noise_multiplier", "clip", "accountant", "seed", "sampling_seed"]
    assert names[-4:] == ["cluster_environment", "process_group_backend", "timeout", "start_method"]
    with pytest.raises(TypeError):
        DPLoRAFederatedStrategy(3.0)
    with pytest.raises(TypeError, match="find_unused_parameters"):
        DPLoRAFederatedStrategy(eps=3.0, find_unused_parameters=True)
