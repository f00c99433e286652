"""DP-Adam on SST-2 at ε = 8 with and without ``RMTDenoise``: dev accuracy along training, the step at which each run
first reaches a target accuracy, and the denoising overhead per step.

    python benchmarks/rmt_sst2.py                                  # defaults (pretrained tiny model if present)
    python benchmarks/rmt_sst2.py --max-steps 300 --eval-every 25 --seeds 0 1 --targets 0.6 0.7 0.75 0.8

Both runs of a seed start from the same weights (one model, deep-copied), use the same Poisson batches (a fixed
``sampling_seed``, for this paired comparison only: a private run leaves it secret), the same optimizer, learning rate,
steps, σ (calibrated for ε = 8) and clip; they differ only by the callback. The DP noise itself is drawn from OS
entropy in each run, as the strategy always does. ε is the same by construction (post-processing) and is printed for
both.

Model: ``--model`` (a Hugging Face name or path) defaults to ``benchmarks/cache/pretrained/tiny-roberta`` when that
folder holds a finished pretraining run (``benchmarks/pretrain_tiny.py``), else a RoBERTa-style model from config
with random weights (a warning is printed: DP fine-tuning from random weights says little). Data, tokenizer, module
and optimizer are those of ``examples/sst2_dpsgd.py`` (imported). By default the word-embedding matrix is frozen and
every other weight is trained (full fine-tuning of the encoder; ``--trainable`` as in the example).

Output: a markdown table (accuracy every ``--eval-every`` steps, steps to each target, s/step, RMT ms/step, mean
surviving singular values) and a JSON file (``--out``, default ``benchmarks/out/rmt_sst2.json``). The time per step
is measured around each training step (without validation); RMT's own time is measured by the callback.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "examples"))
from sst2_dpsgd import AdamSentimentClassifier  # noqa: E402
from sst2_dpzero import DEFAULT_DATA, Encoded, build_model, collate, load_tokenizer, read_sst2  # noqa: E402

from lightning_dp import DPSGDStrategy  # noqa: E402
from lightning_dp.callbacks.rmt import RMTDenoise  # noqa: E402

PRETRAINED = os.path.join(HERE, "cache", "pretrained", "tiny-roberta")


class Monitor(L.Callback):
    """Dev accuracy after each validation, training-step wall time, and RMT's surviving counts per step."""

    def __init__(self, rmt: RMTDenoise | None) -> None:
        self.rmt = rmt
        self.curve: list[tuple[int, float]] = []
        self.step_seconds: list[float] = []
        self.ranks: list[int] = []
        self.zeroed: list[int] = []
        self.edge_ratios: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_seconds.append(time.perf_counter() - self._start)
        if self.rmt is not None:
            self.ranks.append(sum(self.rmt.last_ranks.values()))
            self.zeroed.append(sum(r == 0 for r in self.rmt.last_ranks.values()))
            self.edge_ratios.append(self.rmt.last_max_edge_ratio)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.curve.append((trainer.global_step, float(trainer.callback_metrics["dev_acc"])))


def default_model() -> str | None:
    return PRETRAINED if os.path.isfile(os.path.join(PRETRAINED, "DONE")) else None


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def run(args, base_model, tokenizer, train, dev, seed: int, denoise: bool) -> dict:
    L.seed_everything(seed, verbose=False)
    module = AdamSentimentClassifier(copy.deepcopy(base_model), args.lr)
    rmt = None
    if denoise:
        rmt = RMTDenoise(kappa=args.kappa, min_dim=args.min_dim, norm_correction=args.norm_correction, svd=args.svd,
                         log_per_layer=False)
    monitor = Monitor(rmt)
    strategy = DPSGDStrategy(eps=args.eps, delta=args.delta, clip=args.clip, sampling_seed=1000 + seed)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=args.max_steps,
        val_check_interval=args.eval_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[monitor] + ([rmt] if rmt is not None else []), enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, dev)
    report = strategy.privacy_report()
    steady = monitor.step_seconds[2:] or monitor.step_seconds  # skip the first steps (hook checks, warm-up)
    result = {
        "seed": seed,
        "rmt": denoise,
        "curve": monitor.curve,
        "epsilon": report["epsilon"],
        "delta": report["delta"],
        "noise_multiplier": report["noise_multiplier"],
        "gradient_noise_std": strategy.gradient_noise_std,
        "steps": report["steps"],
        "median_step_s": statistics.median(steady),
        "wall_s": time.time() - start,
    }
    if rmt is not None:
        result.update(
            rmt_ms_per_step=rmt.mean_ms_per_step,
            rmt_matrices=len(rmt.targets),
            mean_surviving=statistics.fmean(monitor.ranks),
            mean_zeroed_matrices=statistics.fmean(monitor.zeroed),
            median_max_edge_ratio=statistics.median(monitor.edge_ratios),
        )
    print(f"[rmt_sst2] seed {seed} rmt={denoise}: curve {monitor.curve} | ε = {report['epsilon']:.4f} | "
          f"{result['median_step_s']:.2f} s/step | {result['wall_s']:.0f} s", flush=True)
    return result


def table(args, results: list[dict], initial: dict[int, float]) -> str:
    lines = []
    steps = sorted({s for r in results for s, _ in r["curve"]})
    head = "| run | seed | step 0 | " + " | ".join(f"step {s}" for s in steps) + " |"
    lines += [head, "|" + "---|" * (3 + len(steps))]
    for r in results:
        accs = dict(r["curve"])
        row = " | ".join(f"{accs[s]:.3f}" if s in accs else "" for s in steps)
        lines.append(f"| {'RMTDenoise' if r['rmt'] else 'DP-Adam'} | {r['seed']} | {initial[r['seed']]:.3f} | {row} |")
    lines += ["", "| run | seed | " + " | ".join(f"first step ≥ {t}" for t in args.targets)
              + " | best | ε | s/step | RMT ms/step | mean surviving singular values per step (matrices zeroed)"
              " | median top σ / threshold |",
              "|" + "---|" * (7 + len(args.targets))]
    for r in results:
        reach = " | ".join(str(first_step_at(r["curve"], t) or "not reached") for t in args.targets)
        best = max(a for _, a in r["curve"])
        extra = (f"{r['rmt_ms_per_step']:.1f} | {r['mean_surviving']:.1f} of {r['rmt_matrices']} matrices "
                 f"({r['mean_zeroed_matrices']:.1f}) | {r['median_max_edge_ratio']:.2f}") if r["rmt"] else "– | – | –"
        lines.append(f"| {'RMTDenoise' if r['rmt'] else 'DP-Adam'} | {r['seed']} | {reach} | {best:.3f} | "
                     f"{r['epsilon']:.3f} | {r['median_step_s']:.2f} | {extra} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else None)
    p.add_argument("--model", default=default_model(),
                   help="Hugging Face model name or path (default: the pretrained tiny RoBERTa if present; \"\": a "
                        "random-init model from config)")
    p.add_argument("--trainable", choices=["all", "no-word-embeddings"], default="no-word-embeddings")
    p.add_argument("--hidden", type=int, default=256, help="random-init model only")
    p.add_argument("--layers", type=int, default=4, help="random-init model only")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="first N training examples (0: all 67,349)")
    p.add_argument("--dev-size", type=int, default=0, help="first N dev examples (0: all 872)")
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128, help="expected batch size (Poisson sampling)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--min-dim", type=int, default=64)
    p.add_argument("--norm-correction", choices=["observed", "signal"], default=None)
    p.add_argument("--svd", choices=["auto", "full", "lowrank"], default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.65, 0.7, 0.75, 0.8])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared machine)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "rmt_sst2.json"))
    args = p.parse_args(argv)
    args.model = args.model or None  # --model "": the random-init model even when the pretrained one exists

    # Lightning's DDP-based strategies set the thread count to cores / processes unless OMP_NUM_THREADS is set
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    if args.model is None:
        print("[rmt_sst2] WARNING: no pretrained model (benchmarks/cache/pretrained/tiny-roberta/DONE not found, no "
              "--model): fine-tuning a randomly initialized model, which says little about DP fine-tuning", flush=True)
    train_rows, dev_rows = read_sst2(args.data_dir)
    if args.train_size:
        train_rows = train_rows[: args.train_size]
    if args.dev_size:
        dev_rows = dev_rows[: args.dev_size]
    tokenizer = load_tokenizer(args.model, args.data_dir)
    train = DataLoader(Encoded(train_rows, tokenizer, args.max_length), batch_size=args.batch_size, collate_fn=collate)
    dev = DataLoader(Encoded(dev_rows, tokenizer, args.max_length), batch_size=256, collate_fn=collate)

    results, initial = [], {}
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        model = build_model(args, tokenizer)  # the classification head is new (random) even for a pretrained model
        if args.trainable == "no-word-embeddings":
            model.get_input_embeddings().weight.requires_grad_(False)
        evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = evaluator.validate(AdamSentimentClassifier(model, args.lr), dev, verbose=False)
        initial[seed] = scores[0]["dev_acc"]
        n_trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        print(f"[rmt_sst2] model {args.model or 'random init'}: {n_trainable / 1e6:.2f}M trainable parameters; "
              f"SST-2 {len(train_rows)} train / {len(dev_rows)} dev; dev accuracy at step 0: {initial[seed]:.3f}",
              flush=True)
        for denoise in (False, True):
            results.append(run(args, model, tokenizer, train, dev, seed, denoise))
            text = table(args, results, initial)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every run: an interrupted benchmark keeps what it measured
                json.dump({"args": vars(args), "initial_accuracy": initial, "results": results, "table": text}, f,
                          indent=2)

    print(table(args, results, initial))
    print(f"[rmt_sst2] results written to {args.out}")


if __name__ == "__main__":
    main()
