"""Privacy-utility table on SST-2 (or QNLI/MNLI): every method of the library on the same model, data and seeds.

    python benchmarks/utility.py --jobs 2 --runs-log benchmarks/out/utility_sst2.jsonl --plot utility_sst2.png
    python benchmarks/utility.py --task qnli --jobs 2 --runs-log benchmarks/out/utility_qnli.jsonl
    python benchmarks/utility.py --seeds 0 --eps 8 --methods dpsgd,dpzero --max-steps 20 --zo-max-steps 200  # a look
    python benchmarks/utility.py --model roberta-base --dpsgd-args "--model.trainable=all --trainer.accelerator=gpu ..."

Methods (each run in its own process through the examples' ``main``, so its peak memory is its own):

``zeroshot``         reference: the data-free head (label descriptions, SST-2; zero for pairs), no training.
``probe``            reference: non-private linear probe, L-BFGS (500 iterations, weight decay 1e-5, fixed
                     beforehand) on the features of all training examples.
``nonprivate``       Adam, σ = 0 and no clipping (the DP-SGD example with ``--noise-multiplier 0 --clip 1e6``).
``dpsgd``            DP-Adam, book-keeping clipping (``examples/sst2_dpsgd.py``).
``dpsgd_rmt``        DP-Adam + ``RMTDenoise`` (post-processing: same ε). Its row also gives the first validated step
                     at which it reaches 95 % of DP-Adam's final accuracy, next to DP-Adam's own.
``mezo``             non-private zeroth order (DPZero with σ = 0 and no clipping): MeZO.
``dpzero``           DPZero (``examples/sst2_dpzero.py``).
``dpzero_stagewise`` DPZero + ``StagewiseZO`` (3 stages) + ``ZOPruning`` (``--prune``, default 1 % of the
                     coordinates).

Defaults: all-MiniLM-L6-v2 (``--model minilm``) and each example's own defaults (its recipe, found by measurement:
see the examples' docstrings), the same steps within a family (``--max-steps`` first-order, ``--zo-max-steps``
zeroth-order). The frozen encoder's features are computed once per task and kept in ``--feature-cache``.
Every flag can be changed (``--dpsgd-args``, ``--nonprivate-args``, ``--dpzero-args``); the table states the command.

Non-private methods have no ε. Each row gives the mean ± std of the dev accuracy over the seeds, the steps, the wall
time of one run and the peak RSS of the run's process (model, data, Lightning). ``--jobs J --threads T`` runs J runs
at a time with T torch threads each; ``--runs-log`` keeps finished runs so that an interrupted table resumes where
it stopped. ``--plot FILE.png`` (needs matplotlib) draws accuracy against ε.

Compare the *shape* with Li et al. (2022) and DPZero (Zhang et al., 2024, Table 2): DPZero at ε = 8 close to MeZO,
DP-Adam at ε = 8 a few points under non-private Adam, every private row above the zero-shot row.
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
from _common import emit_result, run_child  # noqa: E402 (benchmarks/ is not a package)

DEFAULT_FEATURES = os.path.join(HERE, "cache", "features")
DEFAULT_CHECKPOINTS = os.path.join(HERE, "out", "checkpoints")
REFERENCES = ("zeroshot", "probe")
METHODS = (*REFERENCES, "nonprivate", "dpsgd", "dpsgd_rmt", "mezo", "dpzero", "dpzero_stagewise")
PRIVATE = {"dpsgd", "dpsgd_rmt", "dpzero", "dpzero_stagewise"}
ZO_METHODS = {"dpzero", "dpzero_stagewise", "mezo"}
TASK_NAMES = {"sst2": "SST-2", "qnli": "QNLI", "mnli": "MNLI (1,000 held-out training pairs)"}
DEFAULT_DPSGD_ARGS = ""
DEFAULT_NONPRIVATE_ARGS = ""
DEFAULT_DPZERO_ARGS = ""


RMT = ["--trainer.callbacks+=lightning_dp.callbacks.rmt.RMTDenoise", "--trainer.callbacks.min_dim=2"]
NON_PRIVATE = ["--trainer.strategy.eps=null", "--trainer.strategy.noise_multiplier=0", "--trainer.strategy.clip=1e6"]


def method_argv(method: str, eps: float | None, seed: int, args) -> tuple[str, list[str]]:
    """(example module, its CLI flags) of one run."""
    zo = method in ZO_METHODS
    steps = args.zo_max_steps if zo else args.max_steps
    every = max(1, steps // args.evals)
    common = [f"--data.task={args.task}", f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
              f"--trainer.val_check_interval={every}", f"--model.model_name={args.model}",
              f"--data.feature_cache={args.feature_cache}", "--trainer.enable_progress_bar=false",
              # each run its own checkpoint folder (ModelCheckpoint is the configs' last callback)
              f"--trainer.callbacks.dirpath={os.path.join(args.checkpoints, f'{method}-{eps}-{seed}')}"]
    if args.data_dir:
        common.append(f"--data.data_dir={args.data_dir}")
    if args.train_size:
        common.append(f"--data.train_size={args.train_size}")
    if args.dev_size:
        common.append(f"--data.dev_size={args.dev_size}")
    if method in REFERENCES:
        return "reference", [*common, *shlex.split(args.dpsgd_args)]
    if not zo:
        extra = shlex.split(args.dpsgd_args)
        if method == "nonprivate":
            return "sst2_dpsgd", [*common, *extra, *shlex.split(args.nonprivate_args), *NON_PRIVATE]
        return "sst2_dpsgd", [*common, *extra, f"--trainer.strategy.eps={eps}", *(RMT if method == "dpsgd_rmt" else [])]
    extra = shlex.split(args.dpzero_args)
    if method == "mezo":
        return "sst2_dpzero", [*common, *extra, *NON_PRIVATE]
    stagewise = [] if method != "dpzero_stagewise" else [
        "--model.lr_schedule=constant", "--trainer.callbacks+=lightning_dp.callbacks.stagewise.StagewiseZO",
        "--trainer.callbacks.stages=3", "--trainer.callbacks+=lightning_dp.callbacks.pruning.ZOPruning",
        f"--trainer.callbacks.trainable_fraction={args.prune}", "--trainer.callbacks.score=magnitude"]
    return "sst2_dpzero", [*common, *extra, f"--trainer.strategy.eps={eps}", *stagewise]


def reference(argv: list[str]) -> dict:
    """The two reference rows from the examples' own data and features (the DP-SGD example's configuration with
    ``argv``): the data-free head, and an L-BFGS linear probe (non-private) on the features of every training
    example."""
    import torch
    import torch.nn.functional as F
    from glue_common import Features, accuracy, make_cli, num_labels

    cli = make_cli("sst2_dpsgd.yaml", [*argv, "--model.trainable=head", "--trainer.logger=false"])
    net, data = cli.model.net, cli.datamodule
    data.setup("fit")
    train, loader = data.train_set, data.val_dataloader()
    zeroshot = accuracy(net, loader, num_labels(data.task))
    assert isinstance(train, Features)
    head = net.head
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(train.features), train.labels) + 1e-5 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"zeroshot": zeroshot, "probe": accuracy(net, loader, num_labels(data.task))}


def child(spec: dict) -> None:
    """Run one example ``main(argv)`` in this process and emit accuracy, ε, time, peak RSS and the accuracy history."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    start = time.time()
    if spec["module"] == "reference":
        result, report = reference(spec["argv"]), {}
        result["dev_acc"] = result[spec["method"]]
    else:
        module = __import__(spec["module"])
        result, report = module.main(spec["argv"])
    peak_kib = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak_kib = int(line.split()[1])
    emit_result({
        "dev_acc": float(result["dev_acc"]), "epsilon": float(report.get("epsilon") or 0.0),
        "steps": int(report.get("steps") or 0), "seconds": time.time() - start, "peak_rss_mib": peak_kib / 1024,
        "history": result.get("history", []),
    })


def first_step_reaching(history: list, target: float) -> int | None:
    """The first validated step whose accuracy is at least ``target`` (None: never)."""
    return next((step for step, acc in history if acc >= target), None)


def _run(key: tuple, spec: dict, threads: int) -> tuple[tuple, dict]:
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return key, run_child(os.path.abspath(__file__), [f"--child={json.dumps(spec)}"], env=env)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sst2", "qnli", "mnli"), default="sst2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eps", default="3,8", help="comma-separated target ε of the private methods")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=1500, help="steps of the first-order methods")
    p.add_argument("--zo-max-steps", type=int, default=6000, help="steps of the zeroth-order methods")
    p.add_argument("--evals", type=int, default=15, help="validations per run (for the steps-to-95%% column)")
    p.add_argument("--prune", type=float, default=0.01, help="ZOPruning's trainable fraction (dpzero_stagewise)")
    p.add_argument("--model", default="minilm", help="'minilm' or any HF model name or path")
    p.add_argument("--feature-cache", default=DEFAULT_FEATURES, help="where the frozen encoder's features are kept")
    p.add_argument("--checkpoints", default=DEFAULT_CHECKPOINTS, help="each run's checkpoints go to a folder here")
    p.add_argument("--data-dir", default=None, help="default: the examples' default")
    p.add_argument("--train-size", type=int, default=0, help="first N training examples (0: all)")
    p.add_argument("--dev-size", type=int, default=0, help="first N dev examples (0: all)")
    p.add_argument("--dpsgd-args", default=DEFAULT_DPSGD_ARGS,
                   help="CLI flags for examples/sst2_dpsgd.py (non-private, DP-SGD, DP-SGD + RMT)")
    p.add_argument("--nonprivate-args", default=DEFAULT_NONPRIVATE_ARGS,
                   help="flags added for the non-private first-order run (after --dpsgd-args)")
    p.add_argument("--dpzero-args", default=DEFAULT_DPZERO_ARGS,
                   help="CLI flags for examples/sst2_dpzero.py (DPZero, stagewise, MeZO)")
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
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    epsilons = [float(e) for e in args.eps.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]

    plan = {}  # (method, eps, seed) -> spec
    for method in methods:
        for eps in (epsilons if method in PRIVATE else [None]):
            for seed in (seeds[:1] if method in REFERENCES else seeds):  # references are deterministic
                module, run_argv = method_argv(method, eps, seed, args)
                plan[(method, eps, seed)] = {"module": module, "argv": run_argv, "method": method}
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
            runs = [done[(method, eps, seed)] for seed in (seeds[:1] if method in REFERENCES else seeds)]
            accs = [r["dev_acc"] for r in runs]
            rows.append({
                "method": method, "target_eps": eps, "module": plan[(method, eps, seeds[0])]["module"],
                "argv": plan[(method, eps, seeds[0])]["argv"],
                "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "epsilon": statistics.mean(r["epsilon"] for r in runs),
                "steps": runs[0]["steps"], "seconds": statistics.mean(r["seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": runs,
            })
    # steps to 95 % of DP-Adam's final accuracy (mean over seeds) at the same ε: DP-Adam vs DP-Adam + RMT
    dp_final = {r["target_eps"]: r["acc_mean"] for r in rows if r["method"] == "dpsgd"}
    for r in rows:
        if r["method"] in ("dpsgd", "dpsgd_rmt") and r["target_eps"] in dp_final:
            target = 0.95 * dp_final[r["target_eps"]]
            r["steps_to_95"] = [first_step_reaching(run["history"], target) for run in r["runs"]]
    print(f"\n{TASK_NAMES[args.task]} dev accuracy, mean ± std over seeds {args.seeds}; model {args.model}; "
          f"{args.threads} thread(s) per run")
    print("| method | target ε | ε spent | dev accuracy | steps | steps to 95 % of DP-Adam | s/run | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eps = "∞" if r["target_eps"] is None else f"{r['target_eps']:g}"
        spent = "—" if r["target_eps"] is None else f"{r['epsilon']:.2f}"
        to95 = "" if "steps_to_95" not in r else ", ".join("never" if s is None else str(s) for s in r["steps_to_95"])
        print(f"| {r['method']} | {eps} | {spent} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['steps']} | "
              f"{to95} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
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
            kind = "reference" if method in REFERENCES else "non-private"
            ax.axhline(mine[0]["acc_mean"], linestyle="--", color=f"C{i}", label=f"{method} ({kind})")
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
