"""One consistent public API: keyword-only constructors with the same shared arguments in the same order, only the
DDP options that apply, the registry names, the privacy summary at fit start, PrivacyBudget's logging, and every
exception users can see importable from ``lightning_dp``."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import pkgutil
import traceback
import typing
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, linear_data, loader, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger

import lightning_dp
from lightning_dp import DPLoRAFederatedStrategy, DPSGDStrategy, DPZeroStrategy, PrivacyBudget

STRATEGIES = [DPSGDStrategy, DPZeroStrategy, DPLoRAFederatedStrategy]
SHARED = ["eps", "delta", "noise_multiplier", "clip", "accountant", "poisson_sampling", "max_physical_batch_size",
          "seed", "sampling_seed"]
DDP_OPTIONS = ["cluster_environment", "process_group_backend", "timeout", "start_method"]
PACKAGE = Path(lightning_dp.__file__).parent


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_constructors_are_explicit_keyword_only_with_the_shared_arguments_first(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = {p.kind for p in params}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}, f"{cls.__name__}: positional, *args or **kwargs present"
    names = [p.name for p in params]
    shared = [n for n in names if n in SHARED]
    assert shared == [n for n in SHARED if n in shared], f"{cls.__name__}: shared arguments out of order: {shared}"
    assert names[: len(shared)] == shared, f"{cls.__name__}: the shared arguments must come first"
    assert names[-len(DDP_OPTIONS):] == DDP_OPTIONS, f"{cls.__name__}: the DDP options must come last"
    assert {"eps", "delta", "noise_multiplier", "clip", "accountant", "seed", "sampling_seed"} <= set(shared)


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_string_options_are_typed_as_literals_and_documented(cls):
    hints = typing.get_type_hints(cls.__init__)
    for name in ("accountant", "start_method"):
        assert typing.get_origin(hints[name]) is typing.Literal, (cls.__name__, name, hints[name])
    doc = inspect.getdoc(cls) or ""
    assert "Args:" in doc and "Raises:" in doc
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"{name}:" in doc or f"{name}``" in doc, f"{cls.__name__} does not document `{name}`"


@pytest.mark.parametrize("cls", [DPSGDStrategy, DPZeroStrategy], ids=lambda c: c.__name__)
def test_ddp_options_that_apply_are_accepted_and_the_others_refused_by_name(cls):
    s = cls(eps=3, process_group_backend="gloo", timeout=timedelta(seconds=60), start_method="spawn")
    assert s._process_group_backend == "gloo" and s._timeout == timedelta(seconds=60) and s._start_method == "spawn"
    for option in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "ddp_comm_hook",
                   "model_averaging_period"):
        with pytest.raises(TypeError, match=option):
            cls(eps=3, **{option: True})


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_max_physical_batch_size_is_validated(value):
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        DPSGDStrategy(eps=3, max_physical_batch_size=value)


@pytest.mark.parametrize(("name", "cls", "eps"), [("dpzero", DPZeroStrategy, 8.0), ("dpsgd", DPSGDStrategy, 3.0)])
def test_registry_names_build_the_strategy_at_their_default_epsilon(name, cls, eps):
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is cls
    assert trainer.strategy.target_epsilon == eps and trainer.strategy.registered_as == name


def _summary_lines(caplog):
    return [r.getMessage() for r in caplog.records if "accountant=" in r.getMessage()]


def test_a_one_line_privacy_summary_is_printed_at_fit_start(caplog):
    strategy = DPZeroStrategy(eps=3.0, clip=5.0, accountant="rdp", num_directions=4)
    with caplog.at_level(logging.INFO):
        L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=3)).fit(TinyClassifier(), loader(linear_data(), 8))
    (line,) = _summary_lines(caplog)
    assert "\n" not in line
    for part in ("DPZeroStrategy", "target ε=3", f"δ={strategy.delta:.3g}", f"σ={strategy.noise_multiplier:.4g}",
                 f"σ/√4={strategy.effective_noise_multiplier:.4g}", "q=0.125", "3 steps planned", "C=5",
                 "accountant=rdp"):
        assert part in line, (part, line)
    assert "default of" not in line


def test_the_summary_names_the_registry_default(caplog):
    kw = trainer_kwargs(max_steps=2)
    kw.pop("strategy", None)
    with caplog.at_level(logging.INFO):
        L.Trainer(strategy="dpsgd", **kw).fit(TinyClassifier(), loader(linear_data(), 8))
    (line,) = _summary_lines(caplog)
    assert 'target ε=3 (default of strategy="dpsgd")' in line


def test_privacy_budget_follows_the_trainers_log_every_n_steps(tmp_path):
    kw = trainer_kwargs(max_steps=12)
    kw.update(logger=CSVLogger(tmp_path), log_every_n_steps=4)
    strategy = DPSGDStrategy(noise_multiplier=1.0, accountant="rdp")
    trainer = L.Trainer(strategy=strategy, callbacks=[PrivacyBudget(prog_bar=False)], **kw)
    trainer.fit(TinyClassifier(), loader(linear_data(), 8))
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("privacy/epsilon")
    logged_steps = [int(row.split(",")[header.index("step")]) for row in lines[1:] if row.split(",")[col]]
    assert len(logged_steps) == 3, logged_steps  # steps 4, 8, 12 (global_step after the step), not 12 times
    assert "privacy/delta" in header
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(strategy.epsilon, rel=1e-6)


def _library_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="lightning_dp."):
        yield importlib.import_module(info.name)


def test_every_exception_the_library_defines_is_importable_from_the_package():
    defined = {
        obj
        for module in _library_modules()
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("lightning_dp")
    }
    assert defined, "no exception found: the scan is broken"
    missing = sorted(c.__name__ for c in defined if getattr(lightning_dp, c.__name__, None) is not c)
    assert not missing, f"not importable from lightning_dp: {missing}"
    assert all(issubclass(c, lightning_dp.LightningDPError) for c in defined)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_layers_import_downwards_only():
    for path in (PACKAGE / "strategies").glob("*.py"):
        assert not any(m.startswith("lightning_dp.callbacks") for m in _imports(path)), path.name
    for path in (PACKAGE / "mechanisms").glob("*.py"):
        bad = [m for m in _imports(path)
               if m.startswith(("lightning_dp.strategies", "lightning_dp.callbacks", "lightning.")) or m == "lightning"]
        assert not bad, (path.name, bad)


def test_warnings_go_through_lightnings_rank_zero_helpers():
    for path in PACKAGE.rglob("*.py"):
        assert "warnings.warn(" not in path.read_text(), f"{path.relative_to(PACKAGE)} uses warnings.warn"


def test_the_module_check_runs_before_the_process_group_is_created():
    class WithBatchNorm(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net[1] = torch.nn.BatchNorm1d(16)

    with pytest.raises(lightning_dp.ValidationError) as info:
        trainer = L.Trainer(strategy=DPSGDStrategy(eps=3), **trainer_kwargs(max_steps=1))
        trainer.fit(WithBatchNorm(), loader(linear_data(), 8))
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "setup_environment" in frames and "setup_distributed" not in frames


def test_the_federated_strategy_prints_its_client_level_summary(caplog):
    pytest.importorskip("peft")
    from test_federated import fit as federated_fit  # the federated tests' small module, data and LoRA config
    from test_federated import lora

    s = DPLoRAFederatedStrategy(eps=8.0, clients=4, rounds=2, lora=lora(), accountant="rdp")
    with caplog.at_level(logging.INFO):
        federated_fit(s)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DPLoRAFederatedStrategy:")]
    for part in ("client-level target ε=8", "4 clients", "2 rounds planned", f"σ={s.noise_multiplier:.4g}",
                 "accountant=rdp"):
        assert part in line, (part, line)
