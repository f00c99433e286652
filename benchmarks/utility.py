"""Privacy-utility table on SST-2 (or QNLI/MNLI): every method of the library on the same model, data and seeds.

    python benchmarks/utility.py --jobs 2 --runs-log benchmarks/out/utility_sst2.jsonl --plot utility_sst2.png
    python benchmarks/utility.py --seeds 0 --eps 8 --methods dpsgd,dpzero --max-steps 20    # a quick look
    python benchmarks/utility.py --task qnli --methods nonprivate,dpsgd,dpzero,mezo --eps 8
    python benchmarks/utility.py --model roberta-base --dpsgd-args "--accelerator=gpu ..."   # a real checkpoint

Methods (each run in its own process through the examples' ``main``, so its peak memory is its own):

``nonprivate``       Adam, σ = 0 and no clipping (the DP-SGD example with ``--noise-multiplier 0 --clip 1e6``).
``dpsgd``            DP-Adam, book-keeping clipping (``examples/sst2_dpsgd.py``).
``dpsgd_rmt``        DP-Adam + ``RMTDenoise`` (post-processing: same ε).
``dpzero``           DPZero (``examples/sst2_dpzero.py``).
``dpzero_stagewise`` DPZero + ``StagewiseZO`` (3 stages) + ``ZOPruning`` (1 % of the coordinates).
``mezo``             non-private zeroth order (DPZero with σ = 0 and no clipping): MeZO.

Defaults: the model of ``benchmarks/pretrain_tiny.py`` (``benchmarks/cache/pretrained/tiny-roberta``) with LoRA
(r = 8 on query/value, plus the classification head) trained by every method: on this weak model, full
fine-tuning under DP stays at chance within a CPU budget while LoRA's ~100k coordinates carry enough signal per
coordinate. First-order methods: B = 512 (Poisson), Adam lr 5e-3, C = 1, 60 steps. Zeroth-order methods: B = 64,
SGD lr 1e-3, λ = 1e-3, 400 cheaper steps, C = 10, about the 90th percentile of |s_i| here (with C = 2, DPZero
without noise was still at chance after 1000 steps while unclipped MeZO reached 0.56). Sequences are cut at 40
tokens (1.8 % of SST-2's training sentences are longer). Every flag can be changed (``--dpsgd-args``,
``--nonprivate-args``, ``--dpzero-args``, ``--max-steps``, ``--zo-max-steps``); the table states the command.

Non-private methods have no ε. Each row gives the mean ± std of the dev accuracy (macro-averaged: 0.50 is chance
on SST-2) over the seeds, the steps, the wall time of one run and the peak RSS of the run's process (model, data,
Lightning). ``--jobs J --threads T`` runs J runs at a time with T torch threads each; ``--runs-log`` keeps finished
runs so that an interrupted table resumes where it stopped. ``--plot FILE.png`` (needs matplotlib) draws accuracy
against ε.

Compare the *shape* (non-private > DP-SGD > DPZero at the same ε, ε = 8 > ε = 3) with Li et al. (2022) and DPZero
(Zhang et al., 2024, Table 2), not the absolute figures: the model here is tiny and weakly pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import emit_result, run_child  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "cache", "pretrained", "tiny-roberta")
METHODS = ("nonprivate", "dpsgd", "dpsgd_rmt", "dpzero", "dpzero_stagewise", "mezo")
PRIVATE = {"dpsgd", "dpsgd_rmt", "dpzero", "dpzero_stagewise"}
ZO_METHODS = {"dpzero", "dpzero_stagewise", "mezo"}
TASK_NAMES = {"sst2": "SST-2", "qnli": "QNLI", "mnli": "MNLI (1,000 held-out training pairs)"}
DEFAULT_DPSGD_ARGS = "--trainable=lora --max-length=40 --batch-size=512 --lr=5e-3"
DEFAULT_NONPRIVATE_ARGS = ""
DEFAULT_DPZERO_ARGS = "--trainable=lora --max-length=40 --batch-size=64 --lr=1e-3 --clip=10"


def method_argv(method: str, eps: float | None, seed: int, args) -> tuple[str, list[str]]:
    """(example module, argv) of one run."""
    zo = method in ZO_METHODS
    steps = args.zo_max_steps if zo else args.max_steps
    common = [f"--task={args.task}", f"--seed={seed}", f"--max-steps={steps}", f"--val-every={steps}"]
    if args.model:
        common.append(f"--model={args.model}")
    if args.data_dir:
        common.append(f"--data-dir={args.data_dir}")
    if args.train_size:
        common.append(f"--train-size={args.train_size}")
    if args.dev_size:
        common.append(f"--dev-size={args.dev_size}")
    if not zo:
        extra = shlex.split(args.dpsgd_args)
        if method == "nonprivate":
            return "sst2_dpsgd", [*common, *extra, *shlex.split(args.nonprivate_args), "--noise-multiplier=0",
                                  "--clip=1e6"]
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


def _run(key: tuple, spec: dict, threads: int) -> tuple[tuple, dict]:
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return key, run_child(os.path.abspath(__file__), [f"--child={json.dumps(spec)}"], env=env)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sst2", "qnli", "mnli"), default="sst2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eps", default="3,8", help="comma-separated target ε of the private methods")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=60, help="steps of the first-order methods")
    p.add_argument("--zo-max-steps", type=int, default=400, help="steps of the zeroth-order methods (cheaper steps)")
    p.add_argument("--model", default=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else None,
                   help="HF model name or path (default: the model of benchmarks/pretrain_tiny.py when cached)")
    p.add_argument("--data-dir", default=None, help="default: the examples' default")
    p.add_argument("--train-size", type=int, default=0, help="first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="first N dev examples (0: all)")
    p.add_argument("--dpsgd-args", default=DEFAULT_DPSGD_ARGS,
                   help="flags for examples/sst2_dpsgd.py (non-private, DP-SGD, DP-SGD + RMT)")
    p.add_argument("--nonprivate-args", default=DEFAULT_NONPRIVATE_ARGS,
                   help="flags added for the non-private first-order run (after --dpsgd-args)")
    p.add_argument("--dpzero-args", default=DEFAULT_DPZERO_ARGS,
                   help="flags for examples/sst2_dpzero.py (DPZero, stagewise, MeZO)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--runs-log", default=None,
                   help="JSON-lines file: each finished run is appended, and runs already in it are not repeated")
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

    plan = {}  # (method, eps, seed) -> spec
    for method in methods:
        for eps in (epsilons if method in PRIVATE else [None]):
            for seed in seeds:
                module, run_argv = method_argv(method, eps, seed, args)
                plan[(method, eps, seed)] = {"module": module, "argv": run_argv}
    done = {}
    if args.runs_log and os.path.exists(args.runs_log):
        with open(args.runs_log) as f:
            for line in f:
                rec = json.loads(line)
                key = (rec["method"], rec["target_eps"], rec["seed"])
                if key in plan and plan[key]["argv"] == rec["argv"]:  # the same run (same flags)
                    done[key] = rec["result"]
    todo = [k for k in plan if k not in done]
    print(f"{len(plan)} runs, {len(done)} already in {args.runs_log}, {len(todo)} to go "
          f"({args.jobs} at a time, {args.threads} thread(s) each)", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_run, key, plan[key], args.threads) for key in todo]
        for fut in as_completed(futures):
            key, res = fut.result()
            done[key] = res
            method, eps, seed = key
            print(f"  {method} ε={eps} seed={seed}: acc {res['dev_acc']:.4f}, {res['steps']} steps, "
                  f"{res['seconds']:.0f} s", file=sys.stderr, flush=True)
            if args.runs_log:
                with open(args.runs_log, "a") as f:
                    f.write(json.dumps({"method": method, "target_eps": eps, "seed": seed,
                                        "argv": plan[key]["argv"], "result": res}) + "\n")

    rows = []
    for method in methods:
        for eps in (epsilons if method in PRIVATE else [None]):
            runs = [done[(method, eps, seed)] for seed in seeds]
            accs = [r["dev_acc"] for r in runs]
            rows.append({
                "method": method, "target_eps": eps, "module": plan[(method, eps, seeds[0])]["module"],
                "argv": plan[(method, eps, seeds[0])]["argv"],
                "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "epsilon": statistics.mean(r["epsilon"] for r in runs),
                "steps": runs[0]["steps"], "seconds": statistics.mean(r["seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": runs,
            })
    print(f"\n{TASK_NAMES[args.task]} dev accuracy (macro), mean ± std over seeds {args.seeds}; "
          f"model {args.model or 'random init'}; {args.threads} thread(s) per run")
    print("| method | target ε | ε spent | dev accuracy | steps | s/run | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eps = "∞" if r["target_eps"] is None else f"{r['target_eps']:g}"
        spent = "—" if r["target_eps"] is None else f"{r['epsilon']:.2f}"
        print(f"| {r['method']} | {eps} | {spent} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['steps']} | "
              f"{r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot, TASK_NAMES[args.task])


def plot(rows: list[dict], path: str, task: str = "SST-2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        if mine[0]["target_eps"] is None:
            ax.axhline(mine[0]["acc_mean"], linestyle="--", color=f"C{i}", label=f"{method} (non-private)")
            continue
        xs = [r["target_eps"] for r in mine]
        ax.errorbar(xs, [r["acc_mean"] for r in mine], yerr=[r["acc_std"] for r in mine], marker="o", color=f"C{i}",
                    capsize=3, label=method)
    ax.axhline(0.5, linestyle=":", color="gray", label="chance")
    ax.set_xlabel("ε")
    ax.set_ylabel(f"{task} dev accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
