"""Paths by which a run could be under-accounted or leak a record, each refused or fixed (DPSGDStrategy and
DPZeroStrategy; the federated strategy has its own file). Every test here failed on the code before the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, flat_params, linear_data, loader, trainer_kwargs
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

from lightning_dp import DPSGDStrategy, DPZeroStrategy, PerSampleLossError, PrivacyBudget, UnsafeSettingError
from lightning_dp.privacy import PrivacyAccountant


def fit(model, strategy, data=None, batch_size=8, callbacks=(), ckpt_path=None, **kw):
    trainer = L.Trainer(strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data if data is not None else loader(linear_data(), batch_size), ckpt_path=ckpt_path)
    return trainer


STRATEGIES = {
    "dpsgd-bk": lambda **kw: DPSGDStrategy(clipping="bk", **kw),
    "dpsgd-ghost": lambda **kw: DPSGDStrategy(clipping="ghost", **kw),
    "dpzero": lambda **kw: DPZeroStrategy(**kw),
}


# ---------------------------------------------------------------------------------------------- 1. same-batch releases
class LBFGSClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


class TwoStepsPerBatch(TinyClassifier):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        optimizer.step(closure=optimizer_closure)


def test_dpsgd_refuses_an_optimizer_that_evaluates_the_closure_twice():
    strategy = DPSGDStrategy(noise_multiplier=1.0)
    with pytest.raises(UnsafeSettingError, match="more than once in one step"):
        fit(LBFGSClassifier(), strategy, max_steps=2)
    assert strategy.accountant.steps <= 1 and strategy.steps_taken <= 1


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_a_second_optimizer_step_on_the_same_batch_is_refused(name):
    strategy = STRATEGIES[name](noise_multiplier=1.0)
    with pytest.raises(UnsafeSettingError, match="a second time for the same batch"):
        fit(TwoStepsPerBatch(), strategy, max_steps=4)
    assert strategy.steps_taken == 1  # the first release of the batch, nothing more


def test_report_steps_are_optimizer_steps():
    strategy = DPSGDStrategy(noise_multiplier=1.0, accountant="rdp")
    fit(TinyClassifier(), strategy, max_steps=5)
    report = strategy.privacy_report()
    assert report["steps"] == 5 == strategy.accountant.steps and report["releases_per_step"] == 1


# ---------------------------------------------------------------------------------------------- 2. secret sampling seed
def _ints(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _ints(k)
            yield from _ints(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _ints(v)


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_secret_sampling_seed_is_not_saved_and_is_redrawn_on_resume(name, tmp_path):
    strategy = STRATEGIES[name](noise_multiplier=1.0, accountant="rdp")
    trainer = fit(TinyClassifier(), strategy, max_steps=3)
    secret = strategy.sampling_seed
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert "sampling_seed" not in ckpt["lightning_dp"]
    assert secret not in set(_ints(ckpt))
    assert str(secret).encode() not in Path(path).read_bytes()
    resumed = STRATEGIES[name](noise_multiplier=1.0, accountant="rdp")
    fit(TinyClassifier(), resumed, max_steps=6, ckpt_path=path)
    assert resumed.sampling_seed != secret  # a fresh secret seed: the new masks are independent of the old ones
    assert resumed.steps_taken == 6 and resumed.accountant.steps == 6


def test_a_user_chosen_sampling_seed_is_saved(tmp_path):
    strategy = DPSGDStrategy(noise_multiplier=1.0, sampling_seed=1234)
    trainer = fit(TinyClassifier(), strategy, max_steps=2)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert torch.load(tmp_path / "run.ckpt", weights_only=False)["lightning_dp"]["sampling_seed"] == 1234


def test_masks_are_keyed_by_steps_taken_so_none_is_drawn_twice():
    """Across epochs cut short by limit_train_batches, the batch of step t is the Poisson mask of key t."""
    seen = []

    class Record(TinyClassifier):
        def training_step(self, batch, batch_idx):
            seen.append(batch[0].clone())
            return super().training_step(batch, batch_idx)

    strategy = DPSGDStrategy(noise_multiplier=1.0, sampling_seed=5)
    data = linear_data()
    fit(Record(), strategy, data=loader(data, 8), max_epochs=3, max_steps=-1, limit_train_batches=3)
    sampler = strategy._train_sampler
    assert len(seen) == 9
    for t, x in enumerate(seen):
        torch.testing.assert_close(x, data.tensors[0][sampler.global_indices(t)])


# ---------------------------------------------------------------------------------------------- 3. unfrozen later
class Unfreeze(Callback):
    """Like BackboneFinetuning: the first layer, frozen when training starts, is unfrozen (and added to the
    optimizer) at epoch 1."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.net[0].requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.net[0].parameters())})


class HugeLoss(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        head = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return torch.optim.SGD(head, lr=self.lr)

    def training_step(self, batch, batch_idx):
        return 1e4 * super().training_step(batch, batch_idx)


class GradBound(Callback):
    """The gradient the optimizer sees is the private one: with σ = 0, its norm is at most (#examples)·C / E[B]."""

    def __init__(self):
        self.norms, self.bounds, self.privatized = [], [], set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        s = trainer.strategy
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat([g.reshape(-1) for g in grads]).norm()) if grads else 0.0)
        self.bounds.append(s.last_step.num_examples * s.clip / s.expected_batch_size)
        self.privatized = {id(p) for p in s.mechanism.params}


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_dpsgd_privatizes_parameters_unfrozen_after_setup(clipping):
    torch.manual_seed(0)
    model = HugeLoss()
    before = model.net[0].weight.detach().clone()
    bound = GradBound()
    strategy = DPSGDStrategy(noise_multiplier=0.0, clip=1e-3, clipping=clipping)
    fit(model, strategy, callbacks=[Unfreeze(), bound], max_epochs=2, max_steps=-1)
    assert all(n <= b * (1 + 1e-4) + 1e-9 for n, b in zip(bound.norms, bound.bounds)), (bound.norms, bound.bounds)
    assert not torch.equal(model.net[0].weight.detach(), before)  # and it trains (not silently skipped)
    assert bound.privatized == {id(p) for p in model.parameters()}


def test_dpzero_trains_parameters_unfrozen_after_setup():
    torch.manual_seed(0)
    model = HugeLoss()
    before = model.net[0].weight.detach().clone()
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=2.0)
    fit(model, strategy, callbacks=[Unfreeze()], max_epochs=2, max_steps=-1)
    assert not torch.equal(model.net[0].weight.detach(), before)
    assert len(strategy.directions.params) == 4


# ---------------------------------------------------------------------------------------------- 4. one stream
@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_several_train_dataloaders_are_refused(name):
    strategy = STRATEGIES[name](noise_multiplier=1.0)
    loaders = [loader(linear_data(), 8), loader(linear_data(32, seed=1), 4)]
    with pytest.raises(UnsafeSettingError, match="exactly one training dataloader"):
        fit(TinyClassifier(), strategy, data=loaders, max_steps=2)
    assert strategy.steps_taken == 0


class AccumulateLater(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.accumulate_grad_batches = 2


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_accumulation_switched_on_after_setup_is_refused_before_any_release(name):
    strategy = STRATEGIES[name](noise_multiplier=1.0)
    with pytest.raises(UnsafeSettingError, match="became 2 during training"):
        fit(TinyClassifier(), strategy, callbacks=[AccumulateLater()], max_epochs=3, max_steps=-1)
    assert strategy.steps_taken == 8 == strategy.accountant.steps  # epoch 0 only (64 examples / 8)


def test_gradient_accumulation_scheduler_is_refused_at_setup():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    with pytest.raises(UnsafeSettingError, match="GradientAccumulationScheduler"):
        fit(TinyClassifier(), DPSGDStrategy(noise_multiplier=1.0), callbacks=[GradientAccumulationScheduler({1: 2})],
            max_epochs=2, max_steps=-1)


# ------------------------------------------------------------------------------------------ 5. data-dependent buffers
class WithNorm(TinyClassifier):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.net(self.norm(x.unsqueeze(1)).squeeze(1))


class BufferWriter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x):
        self.total += x.detach().sum()
        return x


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpsgd-ghost"])
def test_dpsgd_refuses_running_statistics_of_any_norm_layer(name):
    with pytest.raises(UnsafeSettingError, match="InstanceNorm1d"):
        fit(WithNorm(nn.InstanceNorm1d(1, track_running_stats=True)), STRATEGIES[name](noise_multiplier=1.0))


def test_dpzero_refuses_batchnorm_in_train_mode_probes():
    model = WithNorm(nn.BatchNorm1d(1))
    with pytest.raises(UnsafeSettingError, match="BatchNorm1d"):
        fit(model, DPZeroStrategy(noise_multiplier=1.0, dropout="same"))
    fit(WithNorm(nn.BatchNorm1d(1)), DPZeroStrategy(noise_multiplier=1.0, dropout="off"), max_steps=2)  # eval probes


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_buffer_written_by_the_forward_is_refused_before_the_release(name):
    model = WithNorm(BufferWriter())
    model.norm.train()
    strategy = STRATEGIES[name](noise_multiplier=1.0)
    with pytest.raises(UnsafeSettingError, match="norm.total"):
        fit(model, strategy)
    assert strategy.steps_taken == 0


# ---------------------------------------------------------------------------------------------- 6. per-example contract
class PerToken(TinyClassifier):
    def __init__(self):
        super().__init__(d=4)

    def training_step(self, batch, batch_idx):
        x, y = batch  # x [B, T, 4], y [B·T]: per-token losses
        return F.cross_entropy(self(x.reshape(-1, 4)), y, reduction="none")


def _token_data():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 3, 4, generator=g), torch.randint(0, 2, (64, 3), generator=g))

    def collate(items):
        return torch.stack([x for x, _ in items]), torch.cat([y for _, y in items])

    return DataLoader(ds, batch_size=8, collate_fn=collate)


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_per_token_losses_are_refused_against_the_sampled_count(name):
    strategy = STRATEGIES[name](noise_multiplier=1.0)
    with pytest.raises(PerSampleLossError, match="examples"):
        fit(PerToken(), strategy, data=_token_data(), max_steps=3)
    assert strategy.steps_taken == 0


# ---------------------------------------------------------------------------------------------- 7. non-finite records
def test_a_nan_record_contributes_nothing_and_is_counted():
    data = linear_data()
    data.tensors[0][5] = float("nan")
    strategy = DPSGDStrategy(noise_multiplier=0.0, clip=1.0)
    model = TinyClassifier()
    fit(model, strategy, data=loader(data, 16), max_steps=12)
    assert torch.isfinite(flat_params(model)).all()
    assert strategy.nonfinite_examples >= 1


# ---------------------------------------------------------------------------------------------- 9. budgets honored
def test_budget_with_a_minimum_that_forces_overspending_is_refused():
    strategy = DPSGDStrategy(noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(UnsafeSettingError, match="min_steps=400"):
        fit(TinyClassifier(), strategy, callbacks=[PrivacyBudget(max_epsilon=1.0)], max_steps=500, min_steps=400)
    assert strategy.steps_taken == 0


def test_budget_with_a_harmless_minimum_runs_and_stops():
    strategy = DPSGDStrategy(noise_multiplier=1.0, accountant="rdp")
    fit(TinyClassifier(), strategy, callbacks=[PrivacyBudget(max_epsilon=2.0)], max_steps=500, min_steps=2)
    assert 2 <= strategy.steps_taken < 500 and strategy.epsilon <= 2.0 < strategy.epsilon_after(1)


# ---------------------------------------------------------------------------------------------- 10. no Poisson sampling
def _opacus_eps(sigma, rate, n, delta):
    acc = PrivacyAccountant("rdp")
    acc.step(sigma, rate, n)
    return acc.epsilon(delta)


@pytest.mark.parametrize("name", ["dpsgd-bk", "dpzero"])
def test_without_poisson_sampling_each_epoch_is_one_release_without_amplification(name):
    strategy = STRATEGIES[name](eps=4.0, accountant="rdp", poisson_sampling=False)
    fit(TinyClassifier(), strategy, data=loader(linear_data(), 8, shuffle=True), max_epochs=3, max_steps=-1)
    sigma = strategy.noise_multiplier
    assert strategy.accountant.history == [(sigma, 1.0, 3)]  # 3 epochs, q = 1
    assert strategy.steps_taken == 24
    delta = 64**-1.1
    assert strategy.epsilon == pytest.approx(_opacus_eps(sigma, 1.0, 3, delta), rel=1e-9)
    assert 3.9 < strategy.epsilon <= 4.0
    assert strategy.epsilon > _opacus_eps(sigma, 8 / 64, 24, delta) * 2  # what Poisson accounting would claim
    assert "no amplification" in strategy.privacy_report()["accounting"]


def test_without_poisson_sampling_a_sampler_with_replacement_is_refused():
    data = linear_data()
    dl = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler(torch.ones(64), 64, replacement=True))
    with pytest.raises(UnsafeSettingError, match="replacement"):
        fit(TinyClassifier(), DPSGDStrategy(noise_multiplier=1.0, poisson_sampling=False), data=dl)


def test_without_poisson_sampling_a_repeated_example_is_caught_while_sampling():
    class Repeats:
        batch_size = 4

        def __iter__(self):
            yield [0, 1, 2, 3]
            yield [4, 5, 3, 6]  # 3 again in the same pass

        def __len__(self):
            return 2

    dl = DataLoader(linear_data(), batch_sampler=Repeats())
    strategy = DPSGDStrategy(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.raises(UnsafeSettingError, match="twice within one pass"):
        fit(TinyClassifier(), strategy, data=dl, max_steps=4, use_distributed_sampler=False)
    assert strategy.steps_taken == 1


class Stream(IterableDataset):
    def __iter__(self):
        data = linear_data()
        for i in range(len(data)):
            yield data[i]


def test_an_iterable_dataset_trains_without_poisson_sampling():
    strategy = DPSGDStrategy(eps=4.0, delta=1e-3, accountant="rdp", poisson_sampling=False)
    fit(TinyClassifier(), strategy, data=DataLoader(Stream(), batch_size=8), max_epochs=2, max_steps=-1)
    assert strategy.accountant.history == [(strategy.noise_multiplier, 1.0, 2)] and strategy.steps_taken == 16
    with pytest.raises(UnsafeSettingError, match="delta"):
        fit(TinyClassifier(), DPSGDStrategy(eps=4.0, poisson_sampling=False),
            data=DataLoader(Stream(), batch_size=8), max_epochs=2, max_steps=-1)


def test_a_replaced_user_sampler_is_named_in_a_warning():
    data = linear_data()
    dl = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler(torch.ones(64), 64))
    trainer = L.Trainer(strategy=DPSGDStrategy(noise_multiplier=1.0), **trainer_kwargs(max_steps=1))
    with pytest.warns(UserWarning, match="WeightedRandomSampler is replaced by Poisson sampling"):
        trainer.fit(TinyClassifier(), dl)


# ---------------------------------------------------------------------------------------------- 11. what is private
def test_the_report_holds_no_statistic_of_the_data():
    reports = []
    for seed in (0, 1):
        strategy = DPSGDStrategy(noise_multiplier=1.0, accountant="rdp")
        fit(TinyClassifier(), strategy, data=loader(linear_data(seed=seed), 8), max_steps=4)
        reports.append(strategy.privacy_report())
    assert reports[0] == reports[1]


def test_docs_say_what_is_private_and_what_is_not():
    page = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
    assert "## What is private and what is not" in page
    for word in ("last_step", "EarlyStopping", "nonfinite_examples"):
        assert word in page
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "not private" in readme  # the README's limitations say it too
