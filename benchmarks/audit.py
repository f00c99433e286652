"""Does it work? One-run privacy audits (Steinke, Nasr & Jagielski 2023) of the real strategies: the empirical lower
bound ε_lb next to the claimed ε, for DP-SGD and DPZero at a few ε, without noise, and for non-private training.

    python benchmarks/audit.py                                  # defaults below; a few minutes on 2 CPU cores
    python benchmarks/audit.py --eps 1 2 4 8 --canaries 1000 --steps 500 --methods dpsgd dpzero

Canaries: white-box "dirac" gradient canaries (:class:`lightning_dp.audit.DiracCanaryModule`): example ``j`` has
the loss ``−scale·w[j]``, so its gradient is a fixed direction in its own coordinate (norm ``scale`` ≥ C: DP-SGD
clips it to exactly C). ``m`` canaries are each included with probability ½ by a secret coin and join
``--background`` ordinary examples (their own coordinates) in the training set; the strategy samples them by Poisson
sampling like any example. Score = loss drop of each canary = ``scale·⟨θ_T − θ_0, e_j⟩`` (for DPZero this is the
loss-based score on the same canaries). Guesses: the best of ``r ∈ {m/10, m/4, m/2, m}`` with a Bonferroni
correction, confidence 95%, δ = ``--delta`` for every run.

Rows: ``σ = 0`` is the strategy with clipping but ``noise_multiplier=0`` (claimed ε = ∞; it shows the audit has
power), ``non-private`` is plain Lightning SGD on the mean loss (no clipping, no noise). A sound implementation
gives ε_lb ≤ claimed ε (except with probability 5%); ε_lb well below the claimed ε is expected from a one-run audit
that sees only the final model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.audit import DiracCanaryModule
from lightning_dp.callbacks.audit import CanaryAudit
from lightning_dp.strategies.dpsgd import DPSGDStrategy
from lightning_dp.strategies.dpzero import DPZeroStrategy


class _NonPrivate(L.LightningModule):
    """Plain Lightning training needs a scalar loss: the mean of the dirac losses."""

    def __init__(self, inner: DiracCanaryModule) -> None:
        super().__init__()
        self.inner = inner

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx).mean()

    def configure_optimizers(self):
        return self.inner.configure_optimizers()


def run_one(method: str, eps: float | None, sigma0: bool, args) -> dict:
    m, n = args.canaries, args.background
    audit = CanaryAudit(
        TensorDataset(torch.arange(n, n + m)),
        delta=args.delta,
        loss_fn=lambda module, batch: (module.inner if isinstance(module, _NonPrivate) else module)(batch[0]),
    )
    train = audit.attach(TensorDataset(torch.arange(n)))
    lr = args.lr if method != "dpzero" else args.zo_lr
    model: L.LightningModule = DiracCanaryModule(n + m, scale=args.scale, lr=lr)
    privacy = dict(delta=args.delta, clip=args.clip, accountant=args.accountant)
    privacy.update(noise_multiplier=0.0) if sigma0 else privacy.update(eps=eps)
    if method == "dpsgd":
        strategy = DPSGDStrategy(**privacy)
    elif method == "dpzero":
        strategy = DPZeroStrategy(**privacy)
    else:
        strategy, model = "auto", _NonPrivate(model)
    batch_size = args.zo_batch_size if method == "dpzero" else args.batch_size
    steps = args.zo_steps if method == "dpzero" else args.steps
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, strategy=strategy, callbacks=[audit],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    t0 = time.time()
    trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=method == "none"))
    res = audit.result
    report = trainer.strategy.privacy_report() if method != "none" else {}
    row = {
        "method": {"dpsgd": "DP-SGD", "dpzero": "DPZero", "none": "non-private SGD"}[method],
        "setting": "σ = 0" if sigma0 else ("no DP" if method == "none" else f"ε = {eps:g}"),
        "noise_multiplier": report.get("noise_multiplier"), "sample_rate": report.get("sample_rate"),
        "epsilon_claimed": res.epsilon_claimed, "epsilon_lb": res.epsilon_lb, "r": res.r, "v": res.v, "m": res.m,
        "included": res.included, "steps": steps, "seconds": round(time.time() - t0, 1),
    }
    claimed = "∞" if row["epsilon_claimed"] in (None, float("inf")) else f"{row['epsilon_claimed']:.3f}"
    sigma = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3g}"
    print(f"| {row['method']} | {row['setting']} | {sigma} | {claimed} | {row['epsilon_lb']:.3f} | "
          f"{row['v']}/{row['r']} | {steps} | {row['seconds']} |", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["dpsgd", "dpzero"], choices=["dpsgd", "dpzero"])
    p.add_argument("--eps", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--canaries", type=int, default=1000, help="m")
    p.add_argument("--background", type=int, default=1000, help="ordinary (non-canary) training examples")
    p.add_argument("--steps", type=int, default=300, help="steps of DP-SGD and of the non-private run")
    p.add_argument("--zo-steps", type=int, default=2000, help="steps of DPZero (one scalar per step: it needs more)")
    p.add_argument("--batch-size", type=int, default=100, help="expected batch of DP-SGD (q = B/N)")
    p.add_argument("--zo-batch-size", type=int, default=4000, help="DPZero batch (default: q = 1, full batch)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--zo-lr", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=100.0, help="norm of a canary's gradient before clipping")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    p.add_argument("--no-nonprivate", action="store_true", help="skip the non-private row")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    print(f"m = {args.canaries} canaries (each included with prob. ½), {args.background} other examples, "
          f"{args.steps} steps (DPZero {args.zo_steps}), C = {args.clip}, δ = {args.delta:g}, "
          f"{args.accountant} accountant, 95% confidence")
    print("| method | setting | σ | claimed ε | ε_lb | correct/guesses | steps | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    if not args.no_nonprivate:
        rows.append(run_one("none", None, False, args))
    for method in args.methods:
        rows.append(run_one(method, None, True, args))
        for eps in args.eps:
            rows.append(run_one(method, eps, False, args))
    unsound = [r for r in rows if r["epsilon_claimed"] is not None and r["epsilon_lb"] > r["epsilon_claimed"]]
    print("sound: ε_lb ≤ claimed ε in every row" if not unsound else f"UNSOUND rows: {unsound}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
