"""The pre-flight check (lightning_dp.validate, in lightning_dp.preflight): every problem kind is found on a small
module and not on a clean one, `fix` makes a BatchNorm CNN trainable by DP-SGD, and the strategies raise ONE error
listing every problem before any forward pass."""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, linear_data, loader, trainer_kwargs
from torch import nn
from torch.utils.data import TensorDataset

from lightning_dp import DPLoRAFederatedStrategy, DPSGDStrategy, DPZeroStrategy, UnsafeSettingError
from lightning_dp.errors import ValidationError
from lightning_dp.preflight import Problem, fix, module_problems, optimizer_problems, raise_if_problems, validate


def fit(model, strategy, data=None, **kw):
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data if data is not None else loader(linear_data(), 8))
    return trainer


def kinds(problems):
    return [p.kind for p in problems]


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, problems
    return found[0]


class Counting(TinyClassifier):
    """TinyClassifier that counts its forward passes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return super().forward(x)


class WithBatchNorm(Counting):
    def __init__(self, **bn):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, **bn), nn.Tanh(), nn.Linear(16, 2))


class Scaled(Counting):
    """A trainable parameter on the LightningModule itself: no per-example rule for it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return super().forward(x) * self.scale


class Functional(TinyClassifier):
    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return F.linear(h, self.net[3].weight) + self.net[3](h)  # the first use bypasses the layer's hooks


class Manual(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def with_optimizer(make):
    class M(Counting):
        def configure_optimizers(self):
            return make(self)

    return M()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg)


# ------------------------------------------------------------------------------------------------------ clean modules
@pytest.mark.parametrize("strategy", ["dpsgd", "dpzero", "federated"])
def test_a_clean_module_has_no_problem(strategy):
    assert validate(TinyClassifier(), strategy) == []


@pytest.mark.parametrize("strategy", ["dpsgd", "dpzero"])
def test_bert_from_config_validates_clean(strategy):
    assert validate(tiny_bert(), strategy) == []


def test_strategy_as_instance_class_or_name():
    model = WithBatchNorm()
    by_name = validate(model, "dpsgd")
    assert validate(model, DPSGDStrategy) == by_name == validate(model, DPSGDStrategy(noise_multiplier=1.0))
    assert kinds(validate(model, DPZeroStrategy)) == kinds(validate(model, "dpzero"))
    assert kinds(validate(model, DPLoRAFederatedStrategy)) == ["data_dependent_buffer"]
    with pytest.raises(ValueError, match="unknown strategy"):
        validate(model, "dp-sgd")
    with pytest.raises(TypeError, match="lightning_dp strategy"):
        validate(model, L.strategies.DDPStrategy)


# -------------------------------------------------------------------------------------------------- each kind found
@pytest.mark.parametrize("strategy", ["dpsgd", "dpzero", "federated"])
def test_manual_optimization(strategy):
    problem = only(validate(Manual(), strategy), "manual_optimization")
    assert problem.where == "<root>" and "manual optimization" in problem.message


def test_unsupported_layer_named_with_its_parameters():
    problem = only(validate(Scaled(), "dpsgd"), "unsupported_layer")
    assert problem.where == "<root>" and "<root> (Scaled)" in problem.message and "(scale)" in problem.message
    assert validate(Scaled(), "dpzero") == []  # zeroth-order needs no per-example gradient
    frozen = Scaled()
    frozen.scale.requires_grad_(False)
    assert validate(frozen, "dpsgd") == []


def test_unsupported_layer_reason_from_the_mechanism():
    model = TinyClassifier()
    model.emb = nn.Embedding(10, 4, max_norm=1.0)
    problem = only(validate(model, "dpsgd"), "unsupported_layer")
    assert problem.where == "emb" and "max_norm" in problem.message


def test_batch_mixing_for_dpsgd_even_when_frozen():
    model = WithBatchNorm()
    model.net[1].requires_grad_(False)
    problem = only(validate(model, "dpsgd"), "batch_mixing")
    assert problem.where == "net.1" and "BatchNorm1d" in problem.message and "fix(model)" in problem.fix
    assert "unsupported_layer" not in kinds(validate(WithBatchNorm(), "dpsgd"))  # reported once, as batch mixing


def test_batch_mixing_for_dpzero_only_where_the_probes_mix():
    assert validate(WithBatchNorm(), DPZeroStrategy(noise_multiplier=1.0)) == []  # eval probes read running stats
    assert only(validate(WithBatchNorm(track_running_stats=False), "dpzero"), "batch_mixing").where == "net.1"
    same = validate(WithBatchNorm(), DPZeroStrategy(noise_multiplier=1.0, dropout="same"))
    assert sorted(kinds(same)) == ["batch_mixing", "data_dependent_buffer"]


def test_data_dependent_buffers():
    model = TinyClassifier()
    model.norm = nn.InstanceNorm1d(1, track_running_stats=True)
    problem = only(validate(model, "dpsgd"), "data_dependent_buffer")
    assert problem.where == "norm" and "InstanceNorm1d" in problem.message
    assert validate(model, "dpzero") == []
    assert kinds(validate(model, DPZeroStrategy(noise_multiplier=1.0, dropout="same"))) == ["data_dependent_buffer"]
    assert kinds(validate(model, "federated")) == ["data_dependent_buffer"]
    model.norm = nn.InstanceNorm1d(1)
    assert validate(model, "dpsgd") == []


def test_parameter_used_outside_its_module():
    problem = only(validate(Functional(), "dpsgd"), "parameter_outside_module")
    assert problem.where == "net.3.weight" and "self.net[3].weight" in problem.message
    assert validate(Functional(), "dpzero") == []
    frozen = Functional()
    frozen.net[3].weight.requires_grad_(False)
    assert validate(frozen, "dpsgd") == []

    class Detached(TinyClassifier):
        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[3](h) + 0 * F.linear(h, self.net[3].weight.detach())  # no gradient: not a use

    assert validate(Detached(), "dpsgd") == []

    class InTrainingStep(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x) + x @ self.net[0].weight.T[:, :2], y, reduction="none")

    assert only(validate(InTrainingStep(), "dpsgd"), "parameter_outside_module").where == "net.0.weight"


def test_no_trainable_parameter():
    model = TinyClassifier()
    model.requires_grad_(False)
    assert only(validate(model, "dpsgd"), "no_trainable_parameters").where == "<root>"
    assert kinds(validate(model, "dpzero")) == ["no_trainable_parameters"]  # from the optimizer's parameters


@pytest.mark.parametrize("make, match", [
    (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), "torch.optim.SGD"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), "momentum"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.0, nesterov=False), None),
    (lambda m: [torch.optim.SGD(m.net[0].parameters(), lr=1e-3), torch.optim.SGD(m.net[3].parameters(), lr=1e-3)],
     "exactly one optimizer"),
])
def test_dpzero_optimizer_rules(make, match):
    problems = validate(with_optimizer(make), "dpzero")
    if match is None:
        assert problems == []
    else:
        assert match in only(problems, "optimizer").message
        assert validate(with_optimizer(make), "dpsgd") == []


def test_dpsgd_refuses_lbfgs():
    model = with_optimizer(lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1))
    problem = only(validate(model, "dpsgd"), "optimizer")
    assert problem.where == "optimizer 0" and "more than once in one step" in problem.message


@pytest.mark.parametrize("strategy", ["dpsgd", "federated"])
def test_optimizer_parameters_outside_the_module(strategy):
    extra = nn.Parameter(torch.zeros(3))
    model = with_optimizer(lambda m: torch.optim.SGD([*m.parameters(), extra], lr=0.1))
    assert "(3,)" in only(validate(model, strategy), "optimizer_foreign_parameters").message


def test_an_optimizer_that_needs_the_trainer_is_not_checked():
    model = with_optimizer(lambda m: torch.optim.Adam(m.parameters(), lr=1.0 / m.trainer.max_steps))
    assert validate(model, "dpzero") == []  # configure_optimizers failed without a Trainer: not a problem
    adam = torch.optim.Adam(model.parameters())
    assert kinds(validate(model, "dpzero", optimizers=[adam])) == ["optimizer"]


def test_dpzero_non_contiguous_parameter():
    model = TinyClassifier()
    model.net[3].weight = nn.Parameter(torch.randn(16, 2).t())
    assert only(validate(model, "dpzero"), "non_contiguous_parameter").where == "net.3.weight"
    assert validate(model, "dpsgd") == []


def test_dpzero_low_precision_is_a_warning():
    model = TinyClassifier()
    model.net[3].to(torch.bfloat16)
    problem = only(validate(model, "dpzero"), "low_precision_parameter")
    assert problem.severity == "warning" and problem.where == "net.3.weight" and "2 trainable" in problem.message
    with pytest.warns(UserWarning, match="bfloat16"):
        raise_if_problems([problem], "DPZeroStrategy")  # a warning, not an error


def test_module_and_optimizer_checks_partition_validate():
    model = with_optimizer(lambda m: torch.optim.Adam(m.parameters()))
    model.net[3].weight = nn.Parameter(torch.randn(16, 2).t())
    model.automatic_optimization = False
    adam = model.configure_optimizers()
    assert kinds(module_problems(model, "dpzero")) == ["manual_optimization"]
    assert sorted(kinds(optimizer_problems(model, [adam], "dpzero"))) == ["non_contiguous_parameter", "optimizer"]
    assert sorted(kinds(validate(model, "dpzero"))) == ["manual_optimization", "non_contiguous_parameter", "optimizer"]


# -------------------------------------------------------------------------------------------- Problem and the error
def test_problem_is_a_readable_frozen_record():
    problem = validate(Scaled(), "dpsgd")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.where = "x"
    text = str(problem)
    assert problem.message in text and problem.fix in text and "error" in text and "unsupported_layer" in text
    with pytest.raises(ValueError, match="unknown problem kind"):
        Problem("typo", "<root>", "m", "f")
    with pytest.raises(ValueError, match="severity"):
        Problem("optimizer", "<root>", "m", "f", severity="fatal")


def test_one_error_lists_every_error_with_its_fix():
    problems = validate(WithBatchNorm(), "dpsgd") + validate(Functional(), "dpsgd")
    assert len(problems) == 3
    with pytest.raises(ValidationError) as info:
        raise_if_problems(problems, "DPSGDStrategy")
    err = info.value
    assert err.problems == tuple(problems)
    assert str(err).startswith("DPSGDStrategy cannot train this module privately (3 problems")
    for p in problems:
        assert p.message in str(err) and p.fix in str(err)
    assert isinstance(err, UnsafeSettingError) and type(err) is ValidationError
    copy = pickle.loads(pickle.dumps(err))  # e.g. sent between processes
    assert type(copy) is type(err) and str(copy) == str(err) and copy.problems == err.problems
    raise_if_problems([], "DPSGDStrategy")  # nothing to raise


# --------------------------------------------------------------------------------------------------------------- fix
class CNN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fix_makes_a_batchnorm_cnn_train_with_dpsgd(caplog):
    model = CNN()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    weight, bias = model.bn.weight.detach().clone(), model.bn.bias.detach().clone()
    assert {"batch_mixing", "data_dependent_buffer"} <= set(kinds(validate(model, "dpsgd")))
    with caplog.at_level(logging.INFO):
        fixed = fix(model)
    assert fixed is model  # in place
    assert "replaced bn" in caplog.text
    assert isinstance(model.bn, nn.GroupNorm)
    assert model.bn.num_groups == math.gcd(32, 8) and model.bn.num_channels == 8
    assert torch.equal(model.bn.weight, weight) and torch.equal(model.bn.bias, bias)
    assert validate(model, "dpsgd") == []
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 2, (32,), generator=g))
    before = [p.detach().clone() for p in model.parameters()]
    strategy = DPSGDStrategy(noise_multiplier=1.0)
    fit(model, strategy, data=loader(data, 8), max_steps=1)
    assert strategy.steps_taken == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fix_covers_what_opacus_skips():
    model = TinyClassifier()
    shared = nn.BatchNorm1d(16)
    shared.requires_grad_(False)  # frozen: Opacus' fix leaves it (it only visits trainable layers)
    model.a, model.b = shared, shared
    model.norm = nn.InstanceNorm1d(3, track_running_stats=True)  # no parameter: Opacus' fix leaves it too
    model.eval()
    fix(model)
    assert isinstance(model.a, nn.GroupNorm) and model.a is model.b  # one shared replacement
    assert not model.a.weight.requires_grad and not model.a.training
    assert isinstance(model.norm, nn.InstanceNorm1d) and not model.norm.track_running_stats
    assert dict(model.norm.named_buffers()) == {}  # no buffer the forward could keep writing
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.norm(torch.randn(4, 3, 5))
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert validate(model, "dpsgd") == []


def test_fix_of_a_lone_layer_returns_its_substitute():
    bn = nn.BatchNorm2d(12).to(torch.float64)
    new = fix(bn)
    assert isinstance(new, nn.GroupNorm) and new.num_groups == 4 and new.weight.dtype == torch.float64
    linear = nn.Linear(2, 2)
    assert fix(linear) is linear


# ----------------------------------------------------------------------------------------- the strategies, at setup
class BatchNormAndScale(WithBatchNorm):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return super().forward(x) * self.scale


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_dpsgd_raises_one_error_naming_every_module_problem_before_any_forward(clipping):
    model = BatchNormAndScale()
    strategy = DPSGDStrategy(noise_multiplier=1.0, clipping=clipping)
    with pytest.raises(ValidationError) as info:
        fit(model, strategy)
    message = str(info.value)
    assert "net.1 (BatchNorm1d) mixes the examples" in message and "<root> (BatchNormAndScale)" in message
    assert "running statistics" in message
    assert sorted(kinds(info.value.problems)) == ["batch_mixing", "data_dependent_buffer", "unsupported_layer"]
    assert model.forward_calls == 0 and model.calls == 0 and strategy.steps_taken == 0


def test_dpsgd_raises_one_error_naming_every_optimizer_problem_before_any_forward():
    extra = nn.Parameter(torch.zeros(3))
    model = with_optimizer(lambda m: torch.optim.LBFGS([*m.parameters(), extra], lr=0.1))
    with pytest.raises(ValidationError) as info:
        fit(model, DPSGDStrategy(noise_multiplier=1.0))
    assert sorted(kinds(info.value.problems)) == ["optimizer", "optimizer_foreign_parameters"]
    assert model.forward_calls == 0


def test_dpzero_raises_one_error_naming_every_problem_before_any_forward():
    model = with_optimizer(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    model.net[3].weight = nn.Parameter(torch.randn(16, 2).t())
    with pytest.raises(ValidationError) as info:
        fit(model, DPZeroStrategy(noise_multiplier=1.0))
    message = str(info.value)
    assert "(2 problems" in message and "torch.optim.SGD" in message and "'net.3.weight'" in message
    assert model.forward_calls == 0


def test_dpzero_with_train_mode_probes_refuses_batchnorm_before_any_forward():
    model = WithBatchNorm()
    with pytest.raises(ValidationError) as info:
        fit(model, DPZeroStrategy(noise_multiplier=1.0, dropout="same"))
    assert sorted(kinds(info.value.problems)) == ["batch_mixing", "data_dependent_buffer"]
    assert model.forward_calls == 0
