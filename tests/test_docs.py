"""The documentation site: it builds with ``mkdocs build --strict`` and its Python snippets are valid code.

A snippet preceded by the line ``<!-- runnable -->`` is a complete program (imports, data, ``trainer.fit``) meant to
be run as it stands; every other ``python`` block may be a fragment, but must still compile.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
RUNNABLE = "<!-- runnable -->"
_BLOCK = re.compile(r"(?P<marker><!-- runnable -->\n)?```python\n(?P<code>.*?)\n```", flags=re.S)
# names of the pages that must hold a complete runnable snippet: one per strategy and per callback
PAGES_WITH_A_RUN = [
    "getting-started.md",
    "strategies/dpzero.md",
    "strategies/dpsgd.md",
    "strategies/federated.md",
    "callbacks/privacy-budget.md",
    "callbacks/rmt-denoise.md",
    "callbacks/stagewise-zo.md",
    "callbacks/zo-pruning.md",
    "callbacks/canary-audit.md",
]


def doc_pages():
    """Every Markdown page under docs/, as paths relative to it."""
    pages = []
    for folder, _, files in os.walk(DOCS):
        pages += [os.path.relpath(os.path.join(folder, f), DOCS) for f in files if f.endswith(".md")]
    return sorted(pages)


def python_snippets(page):
    """``(code, runnable)`` for each ```` ```python ```` block of ``page`` (a path relative to docs/)."""
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        text = f.read()
    return [(m.group("code"), m.group("marker") is not None) for m in _BLOCK.finditer(text)]


def runnable_snippets():
    """``(page, index, code)`` of every snippet marked runnable, for a test that runs them."""
    return [(page, i, code) for page in doc_pages() for i, (code, run) in enumerate(python_snippets(page)) if run]


def test_the_marker_is_only_used_right_before_a_python_block():
    for page in doc_pages():
        with open(os.path.join(DOCS, page), encoding="utf-8") as f:
            text = f.read()
        assert text.count(RUNNABLE) == len(re.findall(re.escape(RUNNABLE) + r"\n```python\n", text)), page


@pytest.mark.parametrize("page", doc_pages())
def test_every_python_snippet_compiles(page):
    for i, (code, _) in enumerate(python_snippets(page)):
        compile(code, f"docs/{page} (python block {i})", "exec")


@pytest.mark.parametrize("page", PAGES_WITH_A_RUN)
def test_every_strategy_and_callback_page_has_a_complete_runnable_snippet(page):
    runs = [code for code, run in python_snippets(page) if run]
    assert runs, f"docs/{page} has no snippet marked {RUNNABLE}"
    for code in runs:
        assert "import " in code and ".fit(" in code, f"a runnable snippet of docs/{page} is not a complete run"


def test_mkdocs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and subprocess.run(
        [sys.executable, "-c", "import mkdocs, material, mkdocstrings"], capture_output=True
    ).returncode:
        pytest.skip("mkdocs, mkdocs-material or mkdocstrings is not installed (pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ["index.html", "porting/index.html", "api/strategies/index.html", "benchmarks/index.html"]:
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "strategies" / "index.html").read_text(encoding="utf-8")
    assert "DPZeroStrategy" in api and "num_directions" in api, "the API reference was not generated from the code"
