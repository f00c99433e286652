"""`benchmarks/gpu_check.sh` and its parts, on a machine without a GPU: it refuses loudly (never a silent success),
the kernel check runs in Triton's interpreter, and the report turns the benchmarks' JSON into tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_and_fails():
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_OUT"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_kernel_check_runs_in_the_interpreter(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_kernel_check.py"), "--cpu-interpreter", "--numel",
         str(1 << 22), "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["failed"] == [] and len(result["checks"]) == 17


def test_report_merges_the_benchmarks(tmp_path):
    step = {"median_s": 0.1, "min_s": 0.1, "peak_growth_bytes": 2**20}
    (tmp_path / "kernel_check.json").write_text(json.dumps(
        {"device": "X", "torch": "t", "triton": "3", "checks": [{"check": "a", "ok": True, "detail": ""}],
         "failed": []}))
    (tmp_path / "kernels_opt-1.3b_bfloat16.json").write_text(json.dumps(
        {"ops": [{"op": "copy", "ms": 1.0, "gb_per_s": 2000.0, "vs_copy_floor": 1.0}]}))
    (tmp_path / "dpzero.json").write_text(json.dumps(
        {"args": {"hidden": 8, "layers": 1, "batch_size": 2, "seq_len": 4},
         "results": {"summary": {"inference": step, "trainer": {**step, "median_s": 0.2}}}}))
    (tmp_path / "dpsgd.json").write_text(json.dumps(
        {"args": {"hidden": 8, "layers": 1, "batch_size": 2, "seq_len": 4},
         "summary": {"non-private": step, "ours": {**step, "peak_growth_bytes": 2**21}}}))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(tmp_path), "--out-json",
                    str(tmp_path / "r.json"), "--out-md", str(tmp_path / "r.md")], check=True)
    md = (tmp_path / "r.md").read_text()
    assert "1/1 checks passed" in md and "| trainer | 0.2000 | 2.00 |" in md
    assert "| ours | 0.1000 | 1.00 | 2.0 | 2.00 |" in md
    assert json.loads((tmp_path / "r.json").read_text())["dpsgd"]["summary"]["ours"]["peak_growth_bytes"] == 2**21
