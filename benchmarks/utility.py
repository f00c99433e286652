"""Privacy-utility table on SST-2: every method of the library on the same model, data, steps and seeds.

    python benchmarks/utility.py                                    # all methods, ε ∈ {3, 8}, 3 seeds
    python benchmarks/utility.py --seeds 0 --eps 8 --methods dpsgd,dpzero --max-steps 100     # a quick look
    python benchmarks/utility.py --model PATH_OR_HF_NAME           # default: benchmarks/cache/pretrained/tiny-roberta

Methods (each run in its own process through the examples' ``main``, so its peak memory is its own):

``nonprivate``       Adam, σ = 0 and no clipping (the DP-SGD example with ``--noise-multiplier 0 --clip 1e6``).
``dpsgd``            DP-Adam, book-keeping clipping (``examples/sst2_dpsgd.py``).
``dpsgd_rmt``        DP-Adam + ``RMTDenoise`` (post-processing: same ε).
``dpzero``           DPZero (``examples/sst2_dpzero.py``).
``dpzero_stagewise`` DPZero + ``StagewiseZO`` (3 stages) + ``ZOPruning`` (1 % of the coordinates).
``mezo``             non-private zeroth order (DPZero with σ = 0 and no clipping): MeZO.

Non-private methods run once per seed (no ε). Each row gives the mean ± std of the dev accuracy over the seeds,
the steps, the wall time and the peak RSS of the run (the whole process: model, data, Lightning). With
``--plot FILE.png`` (needs matplotlib) it also draws accuracy against ε.

The methods' hyper-parameters are the examples' defaults unless ``--dpsgd-args`` / ``--dpzero-args`` add flags;
the table states the command. Compare the *shape* (non-private > DP-SGD > DPZero at the same ε, ε = 8 > ε = 3) with
Li et al. (2022) and DPZero (Zhang et al., 2024, Table 2), not the absolute figures: the model here is tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import emit_result, run_child  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "cache", "pretrained", "tiny-roberta")
METHODS = ("nonprivate", "dpsgd", "dpsgd_rmt", "dpzero", "dpzero_stagewise", "mezo")
PRIVATE = {"dpsgd", "dpsgd_rmt", "dpzero", "dpzero_stagewise"}


def method_argv(method: str, eps: float | None, seed: int, args) -> tuple[str, list[str]]:
    """(example module, argv) of one run."""
    common = [f"--seed={seed}", f"--max-steps={args.max_steps}", f"--val-every={args.max_steps}"]
    if args.model:
        common.append(f"--model={args.model}")
    if args.data_dir:
        common.append(f"--data-dir={args.data_dir}")
    if args.train_size:
        common.append(f"--train-size={args.train_size}")
    if args.dev_size:
        common.append(f"--dev-size={args.dev_size}")
    if method in ("nonprivate", "dpsgd", "dpsgd_rmt"):
        extra = shlex.split(args.dpsgd_args)
        if method == "nonprivate":
            return "sst2_dpsgd", [*common, *extra, "--noise-multiplier=0", "--clip=1e6"]
        rmt = ["--rmt"] if method == "dpsgd_rmt" else []
        return "sst2_dpsgd", [*common, *extra, f"--eps={eps}", *rmt]
    extra = shlex.split(args.dpzero_args)
    if method == "mezo":
        return "sst2_dpzero", [*common, *extra, "--noise-multiplier=0", "--clip=1e6"]
    stagewise = ["--stages=3", "--prune=0.01"] if method == "dpzero_stagewise" else []
    return "sst2_dpzero", [*common, *extra, f"--eps={eps}", *stagewise]


def child(spec: dict) -> None:
    """Run one example ``main(argv)`` in this process and emit accuracy, ε, time and peak RSS."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    module = __import__(spec["module"])
    start = time.time()
    result, report = module.main(spec["argv"])
    peak_kib = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak_kib = int(line.split()[1])
    emit_result({
        "dev_acc": float(result["dev_acc"]), "epsilon": float(report.get("epsilon") or 0.0),
        "steps": int(report.get("steps") or 0), "seconds": time.time() - start, "peak_rss_mib": peak_kib / 1024,
    })


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eps", default="3,8", help="comma-separated target ε of the private methods")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--model", default=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else None,
                   help="HF model name or path (default: the model of benchmarks/pretrain_tiny.py when cached)")
    p.add_argument("--data-dir", default=None, help="default: the examples' default")
    p.add_argument("--train-size", type=int, default=0, help="first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="first N dev examples (0: all 872)")
    p.add_argument("--dpsgd-args", default="", help="extra flags for examples/sst2_dpsgd.py")
    p.add_argument("--dpzero-args", default="", help="extra flags for examples/sst2_dpzero.py")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write accuracy vs ε to this PNG (needs matplotlib)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if args.model is None:
        print("warning: no pretrained model (run benchmarks/pretrain_tiny.py): random initialization says little",
              file=sys.stderr)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    epsilons = [float(e) for e in args.eps.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = []
    for method in methods:
        for eps in (epsilons if method in PRIVATE else [None]):
            runs = []
            for seed in seeds:
                module, run_argv = method_argv(method, eps, seed, args)
                spec = {"module": module, "argv": run_argv}
                t0 = time.time()
                res = run_child(os.path.abspath(__file__), [f"--child={json.dumps(spec)}"])
                runs.append(res)
                print(f"  {method} ε={eps} seed={seed}: acc {res['dev_acc']:.4f} ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
            accs = [r["dev_acc"] for r in runs]
            rows.append({
                "method": method, "target_eps": eps, "module": module, "argv": run_argv,
                "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "epsilon": statistics.mean(r["epsilon"] for r in runs),
                "steps": runs[0]["steps"], "seconds": statistics.mean(r["seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": runs,
            })
    print(f"\nSST-2 dev accuracy, {len(seeds)} seed(s), {args.max_steps} steps, model {args.model or 'random init'}")
    print("| method | target ε | ε spent | dev accuracy | steps | s/run | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eps = "∞" if r["target_eps"] is None else f"{r['target_eps']:g}"
        spent = "—" if r["target_eps"] is None else f"{r['epsilon']:.2f}"
        print(f"| {r['method']} | {eps} | {spent} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | {r['steps']} | "
              f"{r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if mine[0]["target_eps"] is None:
            ax.axhline(mine[0]["acc_mean"], linestyle="--", label=f"{method} (non-private)")
            continue
        xs = [r["target_eps"] for r in mine]
        ax.errorbar(xs, [r["acc_mean"] for r in mine], yerr=[r["acc_std"] for r in mine], marker="o", label=method)
    ax.set_xlabel("ε")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
