"""Time and peak memory of one DP-SGD step against a non-private step, on the same model and batch.

    python benchmarks/dpsgd_memory_speed.py                       # CPU, RoBERTa-style classifier, B=32, T=128
    python benchmarks/dpsgd_memory_speed.py --repeats 3 --warmup 1 --mem-steps 1    # quicker
    python benchmarks/dpsgd_memory_speed.py --device cuda --hidden 768 --layers 12 --heads 12 --intermediate 3072

Variants (each measured in its own child process, so peaks and allocator state never mix):

``non-private``   forward, backward of the mean loss, ``optimizer.step()`` (the reference: 1.00x).
``ours``          the library's :class:`~lightning_dp.mechanisms.dpsgd.BookKeepingDPSGD` driven as
                  ``DPSGDStrategy`` drives it: forward with capture, ONE backward of ``Σ_i ℓ_i``, ``private_sum``
                  (clipping + Gaussian noise σC, ``LocalCollective``), ``write_grads(1/B)``, ``optimizer.step()``.
``ours-ghost``    the same with ``clipping="ghost"``: the first backward (to the hooked outputs) streams the norms and
                  frees each output gradient at once, a second backward of ``Σ_i c_i ℓ_i`` gives the clipped sum.
``opacus-hooks``  Opacus ``GradSampleModule`` (hooks mode: per-sample gradients ``[B, *p.shape]``) + ``DPOptimizer``.
``opacus-ghost``  Opacus ghost clipping: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping``
                  + ``DPLossFastGradientClipping`` (what ``PrivacyEngine.make_private(grad_sample_mode="ghost")``
                  builds): two backward passes, no per-sample gradients for linear layers.

All variants use ``torch.optim.SGD`` (no state; ``--optimizer adam``: Adam, whose two state buffers are allocated on
the first step), fp32, the model in ``train()`` mode with every dropout set to 0
(Opacus records activations only in train mode; dropout off keeps the variants computing the same function).
A variant that fails (e.g. a layer Opacus does not support) is reported as ``failed: <reason>``.

Time is the median over ``--repeats`` steps after ``--warmup`` steps (the fastest step is shown too). Memory is the
peak growth over the memory held when only the model, the batch and the libraries are resident (see
``benchmarks/_common.py``), over the whole run from the first step (``--memory-window run``, the default: the first
step of ours is the checked one, and the optimizer allocates its state there) or over ``--mem-steps`` steps after the
warm-up and timed steps (``--memory-window steady``): on CUDA ``max_memory_allocated`` minus the resident
allocation, on CPU the kernel's RSS high-water mark minus the RSS after ``malloc_trim``. Ratios are against
``non-private``.

Target: DP-SGD step time <= 1.15x and peak memory <= 1.10x of the non-private step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    CACHING_MALLOC_ENV,
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

VARIANTS = ("non-private", "ours", "ours-ghost", "opacus-hooks", "opacus-ghost")
TRAINER_VARIANTS = ("non-private", "ours", "ours-ghost")
LR = 1e-4
CLIP = 1.0
NOISE_MULTIPLIER = 1.0


# ---------------------------------------------------------------------------------------------- step functions
def make_optimizer(params, name: str):
    params = list(params)
    return torch.optim.Adam(params, lr=LR) if name == "adam" else torch.optim.SGD(params, lr=LR)


def nonprivate_step(model, batch, device, optimizer: str = "sgd"):
    opt = make_optimizer(trainable_params(model), optimizer)

    def step(t: int) -> None:
        opt.zero_grad(set_to_none=True)
        per_example_loss(model, batch).mean().backward()
        opt.step()

    return step


def ours_step(model, batch, device, optimizer: str = "sgd", mode: str = "bk"):
    """One step as ``DPSGDStrategy.training_step`` + ``backward`` + ``_release`` run it, without Lightning: the
    first step is the checked one (ordinary backward), later ones stop backward at the hooked outputs."""
    from lightning_dp.mechanisms.collective import LocalCollective
    from lightning_dp.mechanisms.dpsgd import BookKeepingDPSGD

    mech = BookKeepingDPSGD(model, CLIP, mode=mode)
    opt = make_optimizer(mech.params, optimizer)
    collective = LocalCollective()
    b = batch["labels"].shape[0]

    def step(t: int) -> None:
        mech.clear_grads()
        mech.reset()
        mech.batch_size = b
        mech.capturing = True
        try:
            losses = per_example_loss(model, batch)
        finally:
            mech.capturing = False
        reference = mech.backward(losses, verify=t == 0)
        if mode == "bk":
            mech.clear_grads()
        flat, _ = mech.private_sum(b, NOISE_MULTIPLIER * CLIP, collective, device, reference_grads=reference)
        del reference
        mech.write_grads(flat, 1.0 / b)
        opt.step()

    return step


def ours_ghost_step(model, batch, device, optimizer: str = "sgd"):
    return ours_step(model, batch, device, optimizer, mode="ghost")


def opacus_hooks_step(model, batch, device, optimizer: str = "sgd"):
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    b = batch["labels"].shape[0]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(make_optimizer(trainable_params(model), optimizer), noise_multiplier=NOISE_MULTIPLIER,
                      max_grad_norm=CLIP, expected_batch_size=b, loss_reduction="mean")

    def step(t: int) -> None:
        opt.zero_grad(set_to_none=True)
        per_example_loss(gsm, batch).mean().backward()
        opt.step()

    return step


def opacus_ghost_step(model, batch, device, optimizer: str = "sgd"):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    b = batch["labels"].shape[0]
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=CLIP,
                                               use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(make_optimizer(trainable_params(model), optimizer),
                                          noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP,
                                          expected_batch_size=b, loss_reduction="mean")
    criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(), loss_reduction="mean")

    def step(t: int) -> None:
        opt.zero_grad(set_to_none=True)
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        criterion(logits.float(), batch["labels"]).backward()  # both backward passes (norms, then clipped sum)
        opt.step()

    return step


def fit_measure(model, batch, device, variant: str, optimizer: str, warmup: int, repeats: int, mem_steps: int,
                clock: str, window: str) -> dict:
    """``--trainer``: the steps run by ``Trainer.fit`` (``non-private``: Lightning's default strategy and the mean
    loss; ``ours`` / ``ours-ghost``: ``DPSGDStrategy(noise_multiplier=1, poisson_sampling=False)``), the same
    batch at every step. Step time from ``on_train_batch_start`` to ``on_train_batch_end`` (optimizer step
    included); memory as in :func:`measure_steps`, the probe started before ``fit``."""
    import lightning as L

    from lightning_dp import DPSGDStrategy

    b = batch["labels"].shape[0]
    private = variant != "non-private"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, data, batch_idx):
            ids, mask, labels = data
            losses = per_example_loss(self.model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
            return {"loss": losses.mean(), "per_sample_loss": losses} if private else losses.mean()

        def configure_optimizers(self):
            return make_optimizer(trainable_params(self.model), optimizer)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def _tick(self) -> float:
            return time.process_time() if clock == "cpu" else now(device)

        def on_train_batch_start(self, *args) -> None:
            self._start = self._tick()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(self._tick() - self._start)

    steps = warmup + repeats + (max(1, mem_steps) if repeats == 0 else 0)
    data = torch.utils.data.TensorDataset(*(batch[k].repeat(steps, *([1] * (batch[k].dim() - 1)))
                                            for k in ("input_ids", "attention_mask", "labels")))
    loader = torch.utils.data.DataLoader(data, batch_size=b, shuffle=False)
    strategy = (DPSGDStrategy(noise_multiplier=NOISE_MULTIPLIER, clip=CLIP, poisson_sampling=False,
                              clipping="ghost" if variant == "ours-ghost" else "auto") if private else "auto")
    clock_cb = Clock()
    trainer = L.Trainer(strategy=strategy, accelerator=device.type, devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[clock_cb])
    probe = PeakMemory(device)
    measure_memory = repeats == 0
    if measure_memory:
        probe.start()
    trainer.fit(Module(), loader)
    if not measure_memory:
        return {"times": clock_cb.times[warmup:]}
    baseline, peak, method = probe.stop()
    return {"times": [], "baseline_bytes": baseline, "peak_growth_bytes": peak, "memory_method": method}


STEPS = {"non-private": nonprivate_step, "ours": ours_step, "ours-ghost": ours_ghost_step,
         "opacus-hooks": opacus_hooks_step,
         "opacus-ghost": opacus_ghost_step}


# ---------------------------------------------------------------------------------------------- child: one variant
def measure_steps(step, device, warmup: int, repeats: int, mem_steps: int, clock: str = "wall",
                  window: str = "steady") -> dict:
    probe = PeakMemory(device)
    if window == "run" and repeats == 0:  # the memory child: the peak over the whole run, first step included
        probe.start()
        for t in range(warmup + max(1, mem_steps)):
            step(t)
        baseline, peak, method = probe.stop()
        return {"times": [], "baseline_bytes": baseline, "peak_growth_bytes": peak, "memory_method": method}
    for t in range(warmup):
        step(t)
    times, kernel = [], []
    for t in range(warmup, warmup + repeats):
        tick = time.process_time if clock == "cpu" else (lambda: now(device))
        before, start = _kernel_usage(), tick()
        step(t)
        times.append(tick() - start)
        kernel.append(_kernel_usage(before))
    # memory on separate steps: the allocator trim before them must not slow the timed steps down
    probe.start()
    for t in range(warmup + repeats, warmup + repeats + max(1, mem_steps)):
        step(t)
    baseline, peak, method = probe.stop()
    return {"times": times, "kernel": kernel, "baseline_bytes": baseline, "peak_growth_bytes": peak,
            "memory_method": method}


def _kernel_usage(since: tuple[float, int] | None = None) -> tuple[float, int]:
    """This process's system (kernel) CPU time and minor page faults so far, or since ``since``: on the CPU the share
    of a step spent mapping fresh memory (``getrusage``; part of ``--clock cpu``'s process time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    now_ = (usage.ru_stime, usage.ru_minflt)
    return now_ if since is None else (now_[0] - since[0], now_[1] - since[1])


def measure_interleaved(names: list[str], model, batch, device, args) -> dict:
    """``--timing interleaved``: every variant on its own copy of the model, in one process, one step of each in
    turn (the first steps, the checked one of ours included, are the warm-up): all variants see the same machine
    conditions, so the per-step ratios survive load from other processes."""
    import copy

    steps = {v: STEPS[v](copy.deepcopy(model), batch, device, args.optimizer) for v in names}
    tick = time.process_time if args.clock == "cpu" else (lambda: now(device))
    times: dict[str, list[float]] = {v: [] for v in names}
    kernel: dict[str, list[tuple[float, int]]] = {v: [] for v in names}
    for t in range(args.warmup + args.repeats):
        for v, step in steps.items():
            before, start = _kernel_usage(), tick()
            step(t)
            if t >= args.warmup:
                times[v].append(tick() - start)
                kernel[v].append(_kernel_usage(before))
    return {"times_by_variant": times, "kernel_by_variant": kernel}


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec, model = step_model(args, device)
    for m in model.modules():  # train mode (Opacus hooks need it) with dropout off, for every variant alike
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                                                 target_modules=["query", "value"], modules_to_save=["classifier"]))
        model.train()
    batch = make_batch(args.batch_size, args.seq_len, spec.vocab, device)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        if args.variant.startswith("interleaved:"):
            out = measure_interleaved(args.variant.split(":", 1)[1].split(","), model, batch, device, args)
        elif args.trainer:
            if args.variant not in TRAINER_VARIANTS or args.memory_window != "run":
                raise ValueError(f"--trainer runs {TRAINER_VARIANTS} with --memory-window run")
            out = fit_measure(model, batch, device, args.variant, args.optimizer, args.warmup, args.repeats,
                              args.mem_steps, args.clock, args.memory_window)
        else:
            step = STEPS[args.variant](model, batch, device, args.optimizer)
            out = measure_steps(step, device, args.warmup, args.repeats, args.mem_steps, args.clock,
                                args.memory_window)
    except Exception as err:  # noqa: BLE001 - reported as a failed row
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        emit_result({"variant": args.variant, "params": n_params, "model_bytes": model_bytes, "failed": msg})
        return
    emit_result({"variant": args.variant, "params": n_params, "trainable": n_trainable, "model_bytes": model_bytes,
                 **out})


# ---------------------------------------------------------------------------------------------- parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, VARIANTS, mem_steps=1)
    p.add_argument("--lora", type=int, default=0,
                   help="train peft LoRA adapters of this rank on query/value (+ the classifier) instead of all "
                        "weights")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time (CPU device only; with --threads 1 it is "
                        "the work done, robust to other processes competing for the cores)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--trainer", action="store_true",
                   help=f"run the steps through Trainer.fit (variants {', '.join(TRAINER_VARIANTS)})")
    p.add_argument("--timing", choices=["separate", "interleaved"], default="separate",
                   help="separate: each variant timed in its own process; interleaved: all variants in one process "
                        "(each on its own model copy), one step of each in turn, ratios of the same moment")
    p.add_argument("--malloc", choices=["default", "caching"], default="default",
                   help="CPU timing children: glibc's defaults, or glibc keeping freed memory for reuse as a caching "
                        "allocator does (benchmarks/_common.py CACHING_MALLOC_ENV; memory is measured as always)")
    p.add_argument("--memory-window", choices=["run", "steady"], default="run",
                   help="run: peak over the whole run from the first step; steady: over --mem-steps steps after the "
                        "warm-up and timed steps")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        child_main(args)
        return
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures CPU time: use it with --device cpu")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "non-private" not in variants:
        raise SystemExit(f"--variants must include 'non-private' and only use {VARIANTS}; got {variants}")
    forwarded = [*step_flags(args), f"--lora={args.lora}", f"--clock={args.clock}", f"--optimizer={args.optimizer}",
                 f"--memory-window={args.memory_window}", *(["--trainer"] if args.trainer else [])]
    script = os.path.abspath(__file__)
    load_before = load_average()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    interleaved = args.timing == "interleaved"
    timing_env = CACHING_MALLOC_ENV if args.malloc == "caching" and args.device == "cpu" else None
    if interleaved and args.trainer:
        raise SystemExit("--timing interleaved times the bare steps; --trainer runs one fit per variant")
    for r in range(args.rounds):  # round-robin, so a burst of load from elsewhere hits all variants alike
        together = {}
        if interleaved:
            res = run_child(script, [*forwarded, f"--variant=interleaved:{','.join(variants)}", "--mem-steps=0"],
                            env=timing_env)
            if "failed" in res:
                raise SystemExit(f"interleaved timing failed: {res['failed']}")
            together = {v: {"times": res["times_by_variant"][v], "kernel": res["kernel_by_variant"][v]}
                        for v in variants}
        for v in variants:
            t0 = time.time()
            # time in one process, memory in another started with EXACT_MALLOC_ENV (RSS follows the live memory;
            # that allocator setting slows allocation down, so it must not be on while timing)
            try:
                res = ({"variant": v, **together[v]} if interleaved
                       else run_child(script, [*forwarded, f"--variant={v}", "--mem-steps=0"], env=timing_env))
                if "failed" not in res:
                    mem = run_child(script, [*forwarded, f"--variant={v}", "--repeats=0",
                                             f"--mem-steps={args.mem_steps}"],
                                    env=EXACT_MALLOC_ENV if args.device == "cpu" else None)
                    res = mem if "failed" in mem else {**mem, **res}
            except Exception as err:  # noqa: BLE001 - the child crashed outright (e.g. killed for memory)
                res = {"variant": v, "failed": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"}
            runs[v].append(res)
            print(f"  round {r + 1}/{args.rounds}: {v:<13} {time.time() - t0:5.1f} s", file=sys.stderr, flush=True)
    load_after = load_average()

    summary: dict[str, dict] = {}
    for v in variants:
        ok = [run for run in runs[v] if "failed" not in run]
        if not ok:
            summary[v] = {"failed": runs[v][0]["failed"]}
            continue
        times = [t for run in ok for t in run["times"]]
        kernel = [k for run in ok for k in run.get("kernel", [])]  # not recorded by --trainer
        summary[v] = {
            "min_s": min(times),
            "median_s": statistics.median(times),
            "kernel_s": statistics.median(k[0] for k in kernel) if kernel else None,
            "minor_faults": statistics.median(k[1] for k in kernel) if kernel else None,
            "peak_growth_bytes": statistics.median(run["peak_growth_bytes"] for run in ok),
        }
    if "failed" in summary["non-private"]:
        raise SystemExit(f"the non-private reference failed: {summary['non-private']['failed']}")
    ref = next(run for run in runs["non-private"] if "failed" not in run)
    ref_time, ref_mem = summary["non-private"]["median_s"], summary["non-private"]["peak_growth_bytes"]
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(
        f"\nRoBERTa-style classifier: {ref['params'] / 1e6:.1f}M params ({ref['model_bytes'] / MiB:.0f} MiB fp32), "
        f"{ref['trainable'] / 1e6:.2f}M trainable" + (f" (LoRA r={args.lora})" if args.lora else "") + ", "
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, ffn {args.intermediate}, vocab {args.vocab}; "
        f"B={args.batch_size}, T={args.seq_len}; {dev}; torch {torch.__version__}, {platform.machine()}"
    )
    print(
        f"time ({'process CPU time' if args.clock == 'cpu' else 'wall clock'}): {args.rounds} round(s) x "
        f"{args.repeats} steps after {args.warmup} warmup ({args.timing}"
        f"{', caching malloc' if timing_env else ''}), ratios on the median step; "
        f"memory: peak growth over the resident model + batch ({ref['memory_method']})"
    )
    busy = args.device == "cpu" and load_before > 0.5
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after"
          + ("  <- other processes were using the CPU: timings are noisy" if busy else ""))
    header = (f"\n{'variant':<14}{'median s/step':>14}{'min':>8}{'x non-private':>15}"
              f"{'peak mem MiB':>14}{'x non-private':>15}{'sys s/step':>12}{'faults/step':>13}")
    print(header)
    print("-" * (len(header) - 1))
    for v in variants:
        r = summary[v]
        if "failed" in r:
            print(f"{v:<14}failed: {r['failed']}")
            continue
        print(f"{v:<14}{r['median_s']:>14.3f}{r['min_s']:>8.3f}{r['median_s'] / ref_time:>14.2f}x"
              f"{r['peak_growth_bytes'] / MiB:>14.1f}{r['peak_growth_bytes'] / max(ref_mem, 1):>14.2f}x"
              + (f"{r['kernel_s']:>12.3f}{r['minor_faults']:>13.0f}" if r["kernel_s"] is not None else ""))
    if interleaved:
        same = {v: statistics.median(a / b for run, ref_run in zip(runs[v], runs["non-private"])
                                     for a, b in zip(run["times"], ref_run["times"]))
                for v in variants if "failed" not in summary[v]}
        summary["same_moment_ratios"] = same
        print(f"\nsame moment (one process, one step of each in turn; median of the per-step ratios over "
              f"{args.rounds * args.repeats} steps): " + ", ".join(f"{v} {x:.3f}x" for v, x in same.items()))
    if any(summary[v].get("kernel_s") is not None for v in variants):
        print("(sys s/step, faults/step: median system CPU time and minor page faults of a timed step, from getrusage: "
              "the kernel's share of the step, mostly mapping fresh memory)")
    print("\ntarget: DP-SGD <= 1.15x non-private time and <= 1.10x non-private memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs, "load": [load_before, load_after]}, f,
                      indent=2)


if __name__ == "__main__":
    main()
