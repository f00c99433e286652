"""Merge the JSON files that ``benchmarks/gpu_check.sh`` writes into one ``gpu_results.json`` and a Markdown table.

    python benchmarks/gpu_report.py RUN_DIR --out-json benchmarks/gpu_results.json --out-md benchmarks/gpu_results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MiB = 2**20


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _step_table(title: str, summary: dict, reference: str, target: str) -> list[str]:
    ref = summary.get(reference, {})
    if "median_s" not in ref:
        return [f"### {title}", "", f"the reference `{reference}` did not run", ""]
    header = f"| variant | s/step (median) | × {reference} time | peak growth MiB | × {reference} memory |"
    lines = [f"### {title}", "", header,
             "|---|---:|---:|---:|---:|"]
    for name, r in summary.items():
        if "median_s" not in r:
            lines.append(f"| {name} | failed: {r.get('failed', '?')} | | | |")
            continue
        lines.append(
            f"| {name} | {r['median_s']:.4f} | {r['median_s'] / ref['median_s']:.2f} | "
            f"{r['peak_growth_bytes'] / MiB:.1f} | {r['peak_growth_bytes'] / max(ref['peak_growth_bytes'], 1):.2f} |"
        )
    return lines + ["", target, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--out-md", required=True)
    args = parser.parse_args()
    run = Path(args.run_dir)
    merged: dict = {"nvidia_smi": (run / "nvidia_smi.txt").read_text().strip() if (run / "nvidia_smi.txt").exists()
                    else None}
    md: list[str] = ["## GPU figures (`bash benchmarks/gpu_check.sh`)", ""]

    check = _load(run / "kernel_check.json")
    merged["kernel_check"] = check
    if check:
        md += [f"Device: {check['device']} ({merged['nvidia_smi'] or 'nvidia-smi n/a'}); torch {check['torch']}, "
               f"triton {check['triton']}.", "",
               f"Compiled Triton kernels against their definitions: {len(check['checks']) - len(check['failed'])}/"
               f"{len(check['checks'])} checks passed" + (f"; FAILED: {', '.join(check['failed'])}" if check["failed"]
                                                          else "") + ".", ""]

    kernels = {p.stem[len("kernels_"):]: _load(p) for p in sorted(run.glob("kernels_*.json"))}
    merged["kernels"] = kernels
    if kernels:
        md += ["### Kernel bandwidth (`benchmarks/kernels.py`; bytes: one read + one write of the parameters)", "",
               "| tensors | op | ms | GB/s | / copy floor |", "|---|---|---:|---:|---:|"]
        for name, k in kernels.items():
            if not k:
                continue
            for op in k["ops"]:
                md.append(f"| {name} | {op['op']} | {op['ms']:.3f} | {op['gb_per_s']:.0f} | "
                          f"{op['vs_copy_floor']:.3f} |")
        md += ["", "Goal: the perturbation passes and clip-and-noise at ≥ 85% of the copy floor.", ""]

    dpzero = _load(run / "dpzero.json")
    merged["dpzero"] = dpzero
    if dpzero:
        a = dpzero["args"]
        md += _step_table(
            f"DPZero step, encoder hidden {a['hidden']} × {a['layers']} layers, B = {a['batch_size']}, "
            f"T = {a['seq_len']}, fp32 (`benchmarks/zo_memory_speed.py`)",
            dpzero["results"]["summary"], "inference", "Goal: DPZero ≤ 2.2× inference time, ≤ 1.05× its memory.")
    for key, title in (("dpsgd", "full fine-tuning"), ("dpsgd_lora", "LoRA r = 8")):
        data = _load(run / f"{key}.json")
        merged[key] = data
        if data:
            a = data["args"]
            md += _step_table(
                f"DP-SGD step ({title}), encoder hidden {a['hidden']} × {a['layers']} layers, B = {a['batch_size']}, "
                f"T = {a['seq_len']}, fp32 (`benchmarks/dpsgd_memory_speed.py`)",
                data["summary"], "non-private", "Goal: ≤ 1.15× non-private time and ≤ 1.10× its memory.")
    Path(args.out_json).write_text(json.dumps(merged, indent=2))
    Path(args.out_md).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
