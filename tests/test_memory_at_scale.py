"""``benchmarks/memory_at_scale.py`` at a tiny size: the prediction that gates every launch, the "not run" rows, one
real step in a child process, and a refused allocation reported as "does not fit"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "memory_at_scale.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_at_scale as mas  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (VmHWM, RLIMIT_AS)")


def test_prediction_fits_a_line_through_the_measured_sizes():
    # peak = 1 GiB + 16 B/param, measured at two sizes: the prediction at a third is the line's value
    rows = [{"params": p, "peak_rss": mas.GiB + 16 * p, "rss_before_model": 0.5 * mas.GiB} for p in (10**8, 3 * 10**8)]
    predicted, basis = mas.predict_peak("adamw", 2 * 10**9, rows)
    assert predicted == pytest.approx(mas.GiB + 16 * 2 * 10**9, rel=1e-9)
    assert "16.0 B/param" in basis and "1.00 GiB" in basis


def test_prediction_from_one_size_scales_the_bytes_above_the_pre_model_rss():
    row = {"params": 10**8, "peak_rss": 0.5 * mas.GiB + 4 * 10**8, "rss_before_model": 0.5 * mas.GiB}
    predicted, basis = mas.predict_peak("dpzero", 10**9, [row])
    assert predicted == pytest.approx(0.5 * mas.GiB + 4 * 10**9)
    assert "4.0 B/param" in basis


def test_prediction_without_measurements_is_the_prior():
    predicted, basis = mas.predict_peak("opacus", 10**9, [])
    assert predicted == mas.GiB + mas.PRIOR_BYTES_PER_PARAM["opacus"] * 10**9
    assert "prior" in basis


def test_over_budget_sizes_are_not_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    mas.main(["--sizes", "tiny2,tiny", "--budget-gib", "0.001", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r["size"]) for r in rows] == [(m, s) for m in mas.METHODS for s in ("tiny", "tiny2")]
    for r in rows:
        assert r["status"] == "not run" and "peak_rss" not in r, r  # no child was started
    assert all("> budget 0.001 GiB" in r["reason"] for r in rows if r["size"] == "tiny")
    assert all(r["reason"] == "a smaller size was not run" for r in rows if r["size"] == "tiny2")
    table = capsys.readouterr().out
    assert "nproc = " in table and "total memory = " in table and "--budget-gib 0.001" in table


def test_one_real_step_in_a_child(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--sizes", "tiny", "--methods", "dpzero", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["status"] == "ok", row
    assert row["params"] == mas.count_params("tiny")
    assert row["peak_rss"] >= row["rss_after_model"] > row["param_bytes"] > 0  # absolute peak, not a growth
    assert row["step_s"] > 0
    assert "| dpzero |" in proc.stdout and "| fits |" in proc.stdout


def test_a_refused_allocation_is_does_not_fit():
    # 0.2 GiB of address space above the child's start-up: the first 154 MiB embedding table of OPT-125M's shape
    # and the rest of the ~0.5 GiB model cannot all be allocated; the failure must come back as a row
    proc = subprocess.run([sys.executable, SCRIPT, "--child", "--method=mezo", "--size=125m", "--batch-size=4",
                           "--seq-len=128", "--threads=1", "--as-headroom-gib=0.2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(mas.RESULT_TAG))
    row = json.loads(line[len(mas.RESULT_TAG):])
    assert row["status"] == "does not fit" and "allocation refused" in row["reason"], row
