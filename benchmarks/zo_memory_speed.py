"""Time and peak memory of one zeroth-order step against inference, on the same model and batch.

    python benchmarks/zo_memory_speed.py                         # CPU, RoBERTa-style ~11M params, B=32, T=128
    python benchmarks/zo_memory_speed.py --device cuda --hidden 768 --layers 12 --heads 12 --intermediate 3072
    python benchmarks/zo_memory_speed.py --profile               # also: where the time of a perturbation pass goes

Variants (timed and measured for memory in separate fresh child processes, so peaks, allocator state and allocator
settings never mix):

``inference``     one forward under ``no_grad`` returning per-example losses ``[B]`` (the reference: 1.00x).
``dpzero``        one DPZero step built from the library's mechanism pieces, three-pass schedule (what
                  ``DPZeroStrategy(zo_schedule="three_pass")`` does): ``SeededDirections.move_to(seed, +λ)``, forward,
                  ``move_to(seed, -λ)``, forward, ``clip_differences``, ``privatize_projected_gradient`` (a
                  ``LocalCollective`` and a ``GaussianNoise``), ``SeededDirections.update`` (restore + update fused).
``dpzero-2pass``  the same with the two-pass schedule (the strategy's default when no callback reads the parameters
                  between steps): the update pass also applies the next step's +λz, so a step is 2 passes.
``mezo``          MeZO's own step (princeton-nlp/MeZO ``zo_step``/``zo_update``): global ``torch.manual_seed(seed)``,
                  ``torch.normal`` per tensor, out-of-place ``p.data = p.data + scale*z*eps``; passes +1, -2, +1
                  (restore), update.
``trainer``       steady-state step of a full ``Trainer(strategy=DPZeroStrategy(...))`` as users run it: Poisson
                  sampling, the auto (two-pass) schedule, default progress bar, model summary, checkpointing and
                  logger. Inside that fit, every timed step is followed by an inference forward and a bare
                  ``dpzero-2pass`` step on the batch the Trainer drew (a copy of the model), so the script also
                  prints Trainer / inference, bare / inference and Trainer / bare on the same batch at the same
                  moment (medians of per-step ratios), the figures that survive other load.

16M-parameter size of RESULTS.md: ``--hidden 256 --layers 10 --batch-size 64 --seq-len 256``.

Time: every variant runs ``--warmup`` untimed steps, then ``--repeats`` timed ones. By default the variants without
Lightning run in one child process, one step of each in turn (``--timing interleaved``), so they all see the same
machine conditions; ``trainer`` runs in its own. ``--rounds`` > 1 repeats everything. The table shows the fastest and
the median step; the ratios use the fastest, the most robust figure on a machine that other processes share (the
1-minute load average is printed with the table). With 2 threads on an oversubscribed CPU the chunked reference
perturbation slows down far more than a forward does (``--profile`` shows it), so compare runs at equal load.

Memory: each variant in its own fresh child process, started with ``EXACT_MALLOC_ENV``: peak growth, over
``--mem-steps`` steps, above the memory held when only the model, the batch and the libraries are resident (see
``benchmarks/_common.py``). On CUDA ``max_memory_allocated`` minus what is allocated before the steps, on CPU the
kernel's RSS high-water mark minus the RSS. Ratios are against ``inference``.

Target: DPZero step time <= 2.2x inference and peak memory <= 1.05x inference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    EXACT_MALLOC_ENV,
    MiB,
    PeakMemory,
    add_step_args,
    emit_result,
    load_average,
    make_batch,
    now,
    per_example_loss,
    run_child,
    step_flags,
    step_model,
    trainable_params,
)
from _common import mezo_step as reference_mezo_step  # noqa: E402

VARIANTS = ("inference", "dpzero", "dpzero-2pass", "mezo", "trainer")
PASSES = {"inference": 0, "dpzero": 3, "dpzero-2pass": 2, "mezo": 4, "trainer": 2}
LR = 1e-6  # the step size does not change the cost; keep the random model numerically tame
ZO_EPS = 1e-3
CLIP = 10.0
NOISE_MULTIPLIER = 1.0


# ---------------------------------------------------------------------------------------------- step functions
def inference_step(model, batch, device):
    def step(t: int, b: dict = batch) -> None:
        with torch.no_grad():
            per_example_loss(model, b)

    return step


def dpzero_step(model, batch, device, two_pass: bool, distribution: str = "gaussian"):
    """One step exactly as ``DPZeroStrategy.training_step`` + ``_private_update`` run it, without Lightning."""
    from lightning_dp.mechanisms.collective import LocalCollective
    from lightning_dp.mechanisms.noise import GaussianNoise
    from lightning_dp.mechanisms.zo import SeededDirections, clip_differences, privatize_projected_gradient

    params = trainable_params(model)
    directions = SeededDirections(params, base_seed=1234, distribution=distribution)
    collective, noise = LocalCollective(), GaussianNoise(device)
    lrs = [LR] * len(params)
    batch_size = batch["labels"].shape[0]

    def step(t: int, b: dict = batch) -> None:
        seed = directions.seed_for(t)
        with torch.no_grad():
            directions.move_to(seed, +ZO_EPS)  # a no-op in the two-pass schedule: the last update applied it
            loss_plus = per_example_loss(model, b)
            directions.move_to(seed, -ZO_EPS)
            loss_minus = per_example_loss(model, b)
            clipped = clip_differences(loss_plus, loss_minus, ZO_EPS, CLIP)
            result = privatize_projected_gradient(
                clipped, NOISE_MULTIPLIER * CLIP, batch_size, collective, noise, device=device
            )
            next_seed = directions.seed_for(t + 1) if two_pass else None
            directions.update(seed, result.projected_grad, lrs, next_seed=next_seed, next_scale=ZO_EPS)

    step.directions = directions  # for the pass count
    return step


def mezo_step(model, batch, device):
    """MeZO's ``zo_step`` + ``zo_update`` (large_models/trainer.py), weight decay 0: :func:`_common.mezo_step`."""
    params = trainable_params(model)

    def step(t: int) -> None:
        with torch.no_grad():
            reference_mezo_step(params, lambda: per_example_loss(model, batch).mean(), 1_000_003 * (t + 1), ZO_EPS,
                                LR)

    return step


# ---------------------------------------------------------------------------------------------- child: one variant
def measure_steps(step, device, warmup: int, repeats: int, mem_steps: int) -> dict:
    for t in range(warmup):
        step(t)
    times = []
    for t in range(warmup, warmup + repeats):
        start = now(device)
        step(t)
        times.append(now(device) - start)
    if not mem_steps:
        return {"times": times}
    probe = PeakMemory(device)
    probe.start()
    for t in range(warmup + repeats, warmup + repeats + mem_steps):
        step(t)
    baseline, peak, method = probe.stop()
    return {"times": times, "baseline_bytes": baseline, "peak_growth_bytes": peak, "memory_method": method}


def measure_trainer(model, batch, device, warmup: int, repeats: int, mem_steps: int,
                    distribution: str = "gaussian") -> dict:
    """A real ``Trainer`` fit as users run it: ``DPZeroStrategy`` with its defaults (Poisson sampling, ``zo_schedule=
    "auto"``), the default callbacks (progress bar, model summary, checkpointing) and the default logger, in a
    temporary directory. Trainer step = interval from the end of one step to the end of the next
    (``on_train_batch_end``; data loading, collate and every hook included).

    With ``repeats``, the end of every step after the warm-up also times one inference forward and one bare
    mechanism step (``dpzero-2pass``, on a copy of the model) on the batch the Trainer just drew; that time is
    excluded from the next Trainer interval. All three variants therefore see the same batch (Poisson sizes vary)
    and the same machine conditions; the ratios are medians of the per-step ratios."""
    import copy
    import tempfile
    import warnings

    import lightning.pytorch as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_dp import DPZeroStrategy

    batch_size = batch["labels"].shape[0]

    class Fixed(Dataset):  # the benchmark's B examples, repeated: expected Poisson batch B (q = 1/100)
        def __len__(self):
            return batch_size * 100

        def __getitem__(self, i):
            j = i % batch_size
            return {k: v[j].cpu() for k, v in batch.items()}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, b, batch_idx):
            return per_example_loss(self.model, b)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    total = warmup + repeats + mem_steps
    probe = PeakMemory(device)
    memory: dict = {}
    times: dict[str, list[float]] = {"trainer": [], "inference": [], "dpzero-2pass": []}
    if repeats:
        bare_model = copy.deepcopy(model)
        others = {"inference": inference_step(bare_model, batch, device),
                  "dpzero-2pass": dpzero_step(bare_model, batch, device, two_pass=True, distribution=distribution)}
    else:
        others = {}
    resumed: list[float] = []
    same_batch_memory: list[dict] = []

    class Clock(L.Callback):
        reads_parameters = False  # keeps the two-pass schedule, as a user's timing callback would

        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if mem_steps and batch_idx >= warmup + repeats:
                probe.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            end = now(device)
            if resumed and warmup <= batch_idx < warmup + repeats:
                times["trainer"].append(end - resumed[-1])
                for name, step in others.items():
                    start = now(device)
                    step(batch_idx, {k: v.to(device) for k, v in b.items()})
                    times[name].append(now(device) - start)
            if mem_steps and batch_idx >= warmup + repeats:
                # the Poisson batch size varies from step to step (activation memory with it): the same batch's
                # inference forward, measured right after in this process, is the reference of this step
                _, trainer_peak, memory["memory_method"] = probe.stop()
                probe.start()
                inference_step(model, {k: v.to(device) for k, v in b.items()}, device)(batch_idx)
                _, inference_peak, _ = probe.stop()
                same_batch_memory.append({"examples": int(b["labels"].shape[0]), "trainer_bytes": trainer_peak,
                                          "inference_bytes": inference_peak})
            if mem_steps and batch_idx == total - 1:
                memory["peak_growth_bytes"] = max(m["trainer_bytes"] for m in same_batch_memory)
                memory["memory_same_batch"] = same_batch_memory
            resumed.append(now(device))

    strategy = DPZeroStrategy(noise_multiplier=NOISE_MULTIPLIER, clip=CLIP, zo_eps=ZO_EPS, seed=1234,
                              direction_distribution=distribution)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            strategy=strategy,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=total,
            limit_val_batches=0,
            callbacks=[Clock()],
            default_root_dir=root,
        )
        loader = DataLoader(Fixed(), batch_size=batch_size, shuffle=True)
        trainer.fit(Module(), loader)
    return {"times": times["trainer"], "times_same_batch": times, "schedule": strategy.schedule, **memory}


def make_step(variant: str, model, batch, device, distribution: str = "gaussian"):
    if variant == "inference":
        return inference_step(model, batch, device)
    if variant == "mezo":
        return mezo_step(model, batch, device)
    return dpzero_step(model, batch, device, two_pass=variant == "dpzero-2pass", distribution=distribution)


def measure_interleaved(variants: list[str], model, batch, device, args) -> dict:
    """Time several variants in one process, one step of each in turn: every variant sees the same machine
    conditions, so their ratios survive load from other processes far better than separate runs do. (The variants
    share the model; the few pending ±λz offsets and 1e-6 updates they leave on it do not change the cost.)"""
    steps = {v: make_step(v, model, batch, device, args.directions) for v in variants}
    for t in range(args.warmup):
        for step in steps.values():
            step(t)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for t in range(args.warmup, args.warmup + args.repeats):
        for v, step in steps.items():
            start = now(device)
            step(t)
            times[v].append(now(device) - start)
    passes = {v: s.directions.passes / (args.warmup + args.repeats)
              for v, s in steps.items() if hasattr(s, "directions")}
    return {"times_by_variant": times, "passes_by_variant": passes}


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec, model = step_model(args, device)
    batch = make_batch(args.batch_size, args.seq_len, spec.vocab, device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.variant == "profile":
        emit_result(profile(model, batch, device, args))
        return
    if args.variant.startswith("interleaved:"):
        out = measure_interleaved(args.variant.split(":", 1)[1].split(","), model, batch, device, args)
    elif args.variant == "trainer":
        out = measure_trainer(model, batch, device, max(1, args.warmup), args.repeats, args.mem_steps,
                              args.directions)
    else:
        step = make_step(args.variant, model, batch, device, args.directions)
        out = measure_steps(step, device, args.warmup, args.repeats, args.mem_steps)
        if hasattr(step, "directions"):
            out["passes_per_step"] = step.directions.passes / (args.warmup + args.repeats + args.mem_steps)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emit_result({"variant": args.variant, "params": n_params, "model_bytes": model_bytes, **out})


# ---------------------------------------------------------------------------------------------- profile
def _median_time(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = now(device)
        fn()
        times.append(now(device) - start)
    return statistics.median(times)


def profile(model, batch, device, args) -> dict:
    """Split one perturbation pass of the library (``SeededDirections.perturb``) into z generation and the
    in-place add, and time a few alternatives for the generation, next to one inference forward."""
    from concurrent.futures import ThreadPoolExecutor

    from custom_kernels.zo_perturb import BLOCK, mix_seed
    from lightning_dp.mechanisms.zo import SeededDirections

    params = trainable_params(model)
    numel = sum(p.numel() for p in params)
    reps = max(3, args.repeats)
    out: dict = {"variant": "profile", "params": numel}

    def forward():
        with torch.no_grad():
            per_example_loss(model, batch)

    out["forward"] = _median_time(forward, device, reps)

    directions = SeededDirections(params, base_seed=7)
    seeds = iter(range(10**6))

    def library_pass():  # p <- p + s*z(seed); alternate signs so the parameters do not drift
        seed = next(seeds)
        directions.perturb(seed, ZO_EPS)
        directions.perturb(seed, -ZO_EPS)

    out["library pass (perturb_)"] = _median_time(library_pass, device, reps) / 2
    signs = SeededDirections(params, base_seed=7, distribution="rademacher")

    def rademacher_pass():
        seed = next(seeds)
        signs.perturb(seed, ZO_EPS)
        signs.perturb(seed, -ZO_EPS)

    out["library pass, Rademacher directions"] = _median_time(rademacher_pass, device, reps) / 2
    if device.type != "cpu":
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every op of the pass single-threaded: no OpenMP region per 64K-element block
    out["what-if: library pass under torch.set_num_threads(1)"] = _median_time(library_pass, device, reps) / 2
    torch.set_num_threads(threads)

    gen, buf = torch.Generator(), torch.empty(BLOCK)
    blocks = [(p.view(-1), start, min(BLOCK, p.numel() - start))
              for p in params for start in range(0, p.numel(), BLOCK)]

    def gen_only():  # exactly the reference path's generation: reseed per block, randn into one block buffer
        for b, (_, _, n) in enumerate(blocks):
            gen.manual_seed(mix_seed(3, b))
            torch.randn(n, generator=gen, out=buf[:n])

    def add_only():  # exactly the reference path's update arithmetic, with z already in the buffer
        with torch.no_grad():
            for flat, start, n in blocks:
                flat[start : start + n].add_(buf[:n], alpha=0.0)

    out["  z generation (torch.randn, mt19937)"] = _median_time(gen_only, device, reps)
    out["  in-place add_"] = _median_time(add_only, device, reps)

    workers = max(1, torch.get_num_threads())
    pool = ThreadPoolExecutor(workers)
    gens = [torch.Generator() for _ in range(workers)]
    bufs = [torch.empty(BLOCK) for _ in range(workers)]

    def _gen_and_add(w: int) -> None:
        with torch.no_grad():
            for b in range(w, len(blocks), workers):
                flat, start, n = blocks[b]
                gens[w].manual_seed(mix_seed(3, b))
                torch.randn(n, generator=gens[w], out=bufs[w][:n])
                flat[start : start + n].add_(bufs[w][:n], alpha=0.0)

    def threaded_pass():  # same stream, blocks spread over `workers` threads (randn/add_ release the GIL)
        list(pool.map(_gen_and_add, range(workers)))

    out[f"what-if: same pass, blocks over {workers} threads"] = _median_time(threaded_pass, device, reps)

    def uniform_only():  # the RNG engine alone, without the Box-Muller transform of randn
        for b, (_, _, n) in enumerate(blocks):
            gen.manual_seed(mix_seed(3, b))
            torch.rand(n, generator=gen, out=buf[:n])

    out["what-if: uniform instead of normal (torch.rand)"] = _median_time(uniform_only, device, reps)
    pool.shutdown()
    return out


# ---------------------------------------------------------------------------------------------- parent
def same_batch_ratios(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """Medians of the per-step ratios of the Trainer step, the bare mechanism step and the inference forward timed
    on the same batch at the same moment (see :func:`measure_trainer`)."""
    pairs = {"Trainer step / inference": ("trainer", "inference"),
             "bare mechanism (2-pass) / inference": ("dpzero-2pass", "inference"),
             "Trainer step / bare mechanism": ("trainer", "dpzero-2pass")}
    return {name: statistics.median(a / b for run in runs for a, b in zip(run[num], run[den]))
            for name, (num, den) in pairs.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, VARIANTS, mem_steps=2)
    p.add_argument("--timing", choices=["interleaved", "separate"], default="interleaved",
                   help="time the non-Lightning variants in one process, a step of each in turn (default), or each "
                        "in its own process")
    p.add_argument("--profile", action="store_true", help="also break a perturbation pass down (CPU: z vs add)")
    p.add_argument("--directions", choices=["gaussian", "rademacher"], default="gaussian",
                   help="distribution of the DPZero directions (DPZeroStrategy's `direction_distribution`)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        child_main(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "inference" not in variants:
        raise SystemExit(f"--variants must include 'inference' and only use {VARIANTS}; got {variants}")
    forwarded = [*step_flags(args), f"--mem-steps={args.mem_steps}", f"--directions={args.directions}"]
    script = os.path.abspath(__file__)
    load_before = load_average()
    # Time: the variants without Lightning run interleaved in one process (one step of each in turn), the Trainer
    # in its own (--timing separate: every variant in its own process). Memory: every variant in its own fresh
    # process, started with EXACT_MALLOC_ENV so the RSS follows the live memory (that allocator setting would
    # distort the timing, hence the separate processes).
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    together = [v for v in variants if v != "trainer"] if args.timing == "interleaved" else []
    for r in range(args.rounds):  # round-robin, so a burst of load from elsewhere hits all variants alike
        t0 = time.time()
        timed: dict[str, dict] = {}
        if together:
            res = run_child(script, [*forwarded, f"--variant=interleaved:{','.join(together)}", "--mem-steps=0"])
            for v in together:
                timed[v] = {"times": res["times_by_variant"][v]}
                if v in res["passes_by_variant"]:
                    timed[v]["passes_per_step"] = res["passes_by_variant"][v]
        for v in variants:
            if v not in timed:
                timed[v] = run_child(script, [*forwarded, f"--variant={v}", "--mem-steps=0"])
            mem = run_child(script, [*forwarded, f"--variant={v}", "--repeats=0"],
                            env=EXACT_MALLOC_ENV if args.device == "cpu" else None)
            runs[v].append({**mem, **timed[v]})
        print(f"  round {r + 1}/{args.rounds}: {time.time() - t0:5.1f} s", file=sys.stderr, flush=True)
    load_after = load_average()

    summary = {}
    for v in variants:
        times = [t for run in runs[v] for t in run["times"]]
        summary[v] = {
            "min_s": min(times),
            "median_s": statistics.median(times),
            "peak_growth_bytes": statistics.median(run["peak_growth_bytes"] for run in runs[v]),
            "passes": runs[v][0].get("passes_per_step", PASSES[v]),
        }
    ref = runs["inference"][0]
    ref_time, ref_mem = summary["inference"]["min_s"], summary["inference"]["peak_growth_bytes"]
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(
        f"\nRoBERTa-style classifier: {ref['params'] / 1e6:.1f}M params ({ref['model_bytes'] / MiB:.0f} MiB fp32), "
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, ffn {args.intermediate}, vocab {args.vocab}; "
        f"B={args.batch_size}, T={args.seq_len}; {dev}; torch {torch.__version__}, {platform.machine()}; "
        f"{args.directions} directions"
    )
    print(
        f"time: {args.rounds} round(s) x {args.repeats} steps after {args.warmup} warmup ({args.timing}), ratios on "
        f"the fastest step; memory: peak growth over the resident model + batch ({ref['memory_method']})"
    )
    busy = args.device == "cpu" and load_before > 0.5
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after"
          + ("  <- other processes were using the CPU before we started: timings are noisy" if busy else ""))
    results: dict = {"summary": summary, "runs": runs, "load": [load_before, load_after]}
    header = (f"\n{'variant':<14}{'passes':>7}{'min s/step':>12}{'median':>9}{'x inference':>13}"
              f"{'peak mem MiB':>14}{'x inference':>13}")
    print(header)
    print("-" * (len(header) - 1))
    for v in variants:
        r = summary[v]
        print(f"{v:<14}{r['passes']:>7.0f}{r['min_s']:>12.3f}{r['median_s']:>9.3f}{r['min_s'] / ref_time:>12.2f}x"
              f"{r['peak_growth_bytes'] / MiB:>14.1f}{r['peak_growth_bytes'] / max(ref_mem, 1):>12.2f}x")
    if "trainer" in variants:
        same = [run["times_same_batch"] for run in runs["trainer"] if "times_same_batch" in run]
        results["same_batch"] = same_batch_ratios(same)
        same_mem = [m for run in runs["trainer"] for m in run.get("memory_same_batch", [])]
        mem = statistics.median(m["trainer_bytes"] / max(m["inference_bytes"], 1) for m in same_mem)
        mem_bare = summary.get("dpzero-2pass", summary["trainer"])["peak_growth_bytes"] / max(ref_mem, 1)
        print(f"\nsame batch, same moment (inside one fit, schedule {runs['trainer'][0].get('schedule')}; median of "
              f"the per-step ratios over {len(same) * args.repeats} steps):")
        for k, v in results["same_batch"].items():
            print(f"  {k:<44}{v:6.2f}x")
        sizes = ", ".join(str(m["examples"]) for m in same_mem)
        print(f"  {'memory: Trainer step / inference':<44}{mem:6.2f}x   (same Poisson batch: {sizes} examples)")
        results["same_batch"]["memory: Trainer step / inference"] = mem
        print(f"  {'memory: bare mechanism (2-pass) / inference':<44}{mem_bare:6.2f}x")
    print("\ntarget: dpzero <= 2.20x inference time and <= 1.05x inference memory; Trainer <= 1.05x bare mechanism")

    if args.profile:
        prof = run_child(script, [*forwarded, "--variant=profile"])
        results["profile"] = prof
        fwd, one_pass = prof["forward"], prof["library pass (perturb_)"]
        print(f"\nprofile ({prof['params'] / 1e6:.1f}M perturbed elements per pass; median times; x = one forward):")
        for k, v in prof.items():
            if isinstance(v, float):
                print(f"  {k:<56}{v * 1e3:9.1f} ms {v / fwd:6.2f}x")
        print("  cost model, step = 2 forwards + k passes:")
        for k in (3, 2):
            print(f"    k={k}: {(2 * fwd + k * one_pass) / fwd:.2f}x inference; 2.20x needs a pass <= "
                  f"{0.2 * fwd / k * 1e3:.1f} ms ({0.2 / k:.3f}x forward)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
