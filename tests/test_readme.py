"""README.md tells the truth: its Python blocks run as written, its test command is the one CI runs, and every
example command it or the docs show is one of ``examples/COMMANDS.md`` (which ``tests/test_examples_cli.py`` runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize("index", range(len(blocks(README, "python"))))
def test_every_python_block_of_the_readme_runs_as_written(index, tmp_path):
    code = blocks(README, "python")[index]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epsilon = float(proc.stdout.strip().splitlines()[-1])  # each block ends by printing the ε it spent
    target = float(re.search(r"eps=(\d+(?:\.\d+)?)", code).group(1))
    assert 0 < epsilon <= target * (1 + 1e-3)


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for block in blocks(README, "bash") for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1 and commands[0].strip() in ci.splitlines()


def _example_lines(text: str) -> list[str]:
    return [line.strip() for block in blocks(text, "bash") for line in block.splitlines() if "examples/" in line]


def test_every_example_command_shown_is_one_the_tests_run():
    listed = set(_example_lines((REPO / "examples" / "COMMANDS.md").read_text()))
    assert listed
    shown = {"README.md": _example_lines(README)}
    for page in (REPO / "docs").rglob("*.md"):
        if not page.name.startswith("_"):
            shown[str(page.relative_to(REPO))] = _example_lines(page.read_text())
    missing = {where: [c for c in lines if c not in listed] for where, lines in shown.items()}
    assert not {k: v for k, v in missing.items() if v}, missing
    assert len(shown["README.md"]) >= 5
