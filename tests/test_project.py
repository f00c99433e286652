"""The project's promises about itself: CI runs the README's test command."""

import os
import re

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
