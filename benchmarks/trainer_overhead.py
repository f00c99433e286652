"""Per-step overhead of the full ``Trainer`` over the bare DPZero mechanism, at the README example's size.

    python benchmarks/trainer_overhead.py --feature-cache CACHE_DIR       # the main example, 300 steps
    python benchmarks/trainer_overhead.py --steps 100 --data-dir DIR

Runs ``examples/sst2_dpzero.py`` as its README command does (``examples/configs/sst2_dpzero.yaml``: DPZero at ε = 8,
the 770-weight head on the frozen all-MiniLM-L6-v2 features, Poisson B = 256, 16 directions per step, SGD with linear
decay, ``PrivacyBudget``, the progress bar, the logger and checkpointing as configured), for ``--steps`` steps without
validation, checkpoints written to a temporary folder. Inside that fit, after every step past ``--warmup``, the same
batch the Trainer drew goes through one bare mechanism step (on a copy of the module: 16 directions of
``SeededDirections.move_to`` ±λ and two ``training_step`` forwards each, ``clip_differences``, one
``privatize_projected_gradients`` for all directions, one fused ``SeededDirections.update`` with the next step's +λz:
what ``DPZeroStrategy`` does, without Lightning). The Trainer step is the interval from the end of one step to the end
of the next (data fetch, Poisson batch assembly, collate, every hook, logging, the progress bar and the LR scheduler
included), with the bare step's own time taken out. Ratios are medians of the per-step ratios (same batch, same
moment), the figure that survives load from other processes. A second, short fit measures Lightning's own floor on the
same data: the default strategy and a step that does nothing (data fetch and collate, hooks, progress bar, optimizer
wrapper): what no strategy can remove.

``--profile``: also a ``cProfile`` of ``--profile-steps`` Trainer steps: where the time outside the mechanism goes.

Target: Trainer step <= 1.05x the bare mechanism step.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
sys.path.insert(0, HERE)
from _common import load_average  # noqa: E402


def bare_step(module, strategy):
    """One DPZero step on ``batch`` exactly as ``DPZeroStrategy`` runs it, on ``module`` (a copy), without
    Lightning."""
    from lightning_dp.mechanisms.collective import LocalCollective
    from lightning_dp.mechanisms.noise import GaussianNoise
    from lightning_dp.mechanisms.zo import SeededDirections, clip_differences, privatize_projected_gradients

    params = [p for p in module.parameters() if p.requires_grad]
    directions = SeededDirections(params, base_seed=1234)
    collective, noise = LocalCollective(), GaussianNoise(torch.device("cpu"))
    q, lam, clip = strategy.num_directions, strategy.zo_eps, strategy.clip
    sigma, expected = strategy.noise_multiplier, strategy.expected_batch_size

    def step(t: int, batch, lr: float) -> None:
        seeds = [directions.seed_for(t, j) for j in range(q)]
        module.eval()
        with torch.no_grad():
            clipped = []
            for seed in seeds:
                directions.move_to(seed, +lam)
                plus = module.training_step(batch, t)["per_sample_loss"]
                directions.move_to(seed, -lam)
                minus = module.training_step(batch, t)["per_sample_loss"]
                clipped.append(clip_differences(plus, minus, lam, clip))
            results = privatize_projected_gradients(clipped, sigma * clip, expected, collective, noise,
                                                    device=torch.device("cpu"))
            grads = [r.projected_grad for r in results]
            directions.update(seeds, grads, [lr] * len(params), next_seed=directions.seed_for(t + 1),
                              next_scale=lam)

    return step


def lightning_floor(data, steps: int, warmup: int, root: str) -> float:
    """Median per-step time of Lightning's own loop on the same training data: the default strategy, a module whose
    step does (almost) nothing, the progress bar on, the DataLoader of the example (shuffled batches of the same
    size, collated the same way)."""
    import lightning.pytorch as L

    class Noop(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w * 0).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    times: list[float] = []

    class Clock(L.Callback):
        last = None

        def on_train_batch_end(self, trainer, *args) -> None:
            t = time.perf_counter()
            if self.last is not None and trainer.global_step > warmup:
                times.append(t - self.last)
            self.last = t

    loader = torch.utils.data.DataLoader(data.train_set, batch_size=data.batch_size, shuffle=True,
                                         collate_fn=data.collate_fn)
    trainer = L.Trainer(max_steps=steps, callbacks=[Clock()], default_root_dir=os.path.join(root, "floor"),
                        limit_val_batches=0, enable_checkpointing=False, logger=False, enable_model_summary=False)
    trainer.fit(Noop(), loader)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="Trainer steps (below the config's val_check_interval)")
    p.add_argument("--warmup", type=int, default=20, help="steps not timed (first step, first accountant call)")
    p.add_argument("--feature-cache", default=None, help="folder for the frozen encoder's features (reused)")
    p.add_argument("--data-dir", default=None, help="folder with glue/SST-2 (default: the example's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="cProfile some Trainer steps")
    p.add_argument("--profile-steps", type=int, default=50)
    p.add_argument("--profile-out", default=None, help="also write the cProfile statistics to this file")
    p.add_argument("--json", default=None)
    p.add_argument("flags", nargs="*", help="more flags for the example's CLI (after --), e.g. "
                                             "--trainer.enable_progress_bar=false")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning.pytorch as L
    from glue_common import make_cli

    from lightning_dp.privacy import is_empty_batch

    flags = [f"--trainer.max_steps={args.steps}", "--trainer.val_check_interval=100000",
             "--trainer.limit_val_batches=0"]
    flags += args.flags
    if args.feature_cache:
        flags.append(f"--data.feature_cache={args.feature_cache}")
    if args.data_dir:
        flags.append(f"--data.data_dir={args.data_dir}")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli("sst2_dpzero.yaml", flags + [f"--trainer.default_root_dir={root}"])
        trainer, module, data = cli.trainer, cli.model, cli.datamodule
        for cb in trainer.callbacks:
            if isinstance(cb, L.callbacks.ModelCheckpoint):
                cb.dirpath = os.path.join(root, "checkpoints")
        times: dict[str, list[float]] = {"trainer": [], "bare": []}
        sizes: list[int] = []
        profiler = cProfile.Profile() if args.profile else None

        class Clock(L.Callback):
            reads_parameters = False  # a timing callback, declared harmless: the two-pass schedule stays

            def __init__(self) -> None:
                self.resumed = None
                self.bare = None

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                end = time.perf_counter()
                step = trainer.global_step  # (batch_idx restarts every epoch)
                if profiler is not None:
                    profiler.disable()  # the profile holds Trainer steps only, never the bare ones
                if self.bare is None:
                    self.bare = bare_step(copy.deepcopy(pl_module), trainer.strategy)
                if self.resumed is not None and step > args.warmup and not is_empty_batch(batch):
                    # (a step whose Poisson batch is empty is noise only: not a step of the mechanism to compare)
                    times["trainer"].append(end - self.resumed)
                    start = time.perf_counter()
                    self.bare(step, batch, trainer.optimizers[0].param_groups[0]["lr"])
                    times["bare"].append(time.perf_counter() - start)
                    sizes.append(int(batch["labels"].shape[0]))
                self.resumed = time.perf_counter()
                if profiler is not None and args.warmup <= step < args.warmup + args.profile_steps:
                    profiler.enable()

        trainer.callbacks.append(Clock())
        start = time.time()
        trainer.fit(module, datamodule=data)
        wall = time.time() - start
        floor = lightning_floor(data, args.steps, args.warmup, root)
    load_after = load_average()

    if not times["bare"]:
        raise SystemExit("no non-empty batch was timed: raise --steps or the batch size")
    ratios = [a / b for a, b in zip(times["trainer"], times["bare"])]
    result = {
        "steps_timed": len(ratios),
        "trainer_median_s": statistics.median(times["trainer"]),
        "bare_median_s": statistics.median(times["bare"]),
        "trainer_over_bare_median": statistics.median(ratios),
        "overhead_median_s": statistics.median(a - b for a, b in zip(times["trainer"], times["bare"])),
        "batch_sizes": [min(sizes), statistics.median(sizes), max(sizes)],
        "load": [load_before, load_after],
        "fit_wall_s": wall,
        "lightning_floor_s": floor,
    }
    print(f"\nexamples/sst2_dpzero.py config ({sum(p.numel() for p in module.parameters() if p.requires_grad)} "
          f"trainable), Poisson batch {result['batch_sizes'][0]}-{result['batch_sizes'][2]} (median "
          f"{result['batch_sizes'][1]:.0f}), {trainer.strategy.num_directions} directions; CPU, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, {platform.machine()}")
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after; fit of {args.steps} steps: "
          f"{wall:.1f} s")
    print(f"\n{len(ratios)} steps, same batch, same moment (medians):")
    print(f"  Trainer step                     {result['trainer_median_s'] * 1e3:8.2f} ms")
    print(f"  bare mechanism step              {result['bare_median_s'] * 1e3:8.2f} ms")
    print(f"  Trainer - bare (per step)        {result['overhead_median_s'] * 1e3:8.2f} ms")
    print(f"  Trainer / bare                   {result['trainer_over_bare_median']:8.3f}x   (target <= 1.05x)")
    print(f"  Lightning's own floor            {floor * 1e3:8.2f} ms   (default strategy, a no-op step, the same "
          f"training data: {floor / result['bare_median_s']:.2f}x of the bare step)")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile of {args.profile_steps} Trainer steps (bare steps excluded), by own time:")
        print(out.getvalue())
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": result, "times": times}, f, indent=2)


if __name__ == "__main__":
    main()
