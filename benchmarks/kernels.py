"""Throughput and memory of the custom kernels against a copy floor and MeZO's perturbation, in one run.

Prints, for one list of parameter-shaped tensors:

* GB/s of ``perturb_`` (single stream), ``perturb_`` (two fused streams + decay: restore + update + next
  perturbation), ``clip_and_noise_`` (per-example rows form, noise on), ``p.add_(1.0)`` over the same tensors (the
  copy floor: one read + one write) and MeZO's perturbation (``torch.manual_seed`` + per tensor
  ``torch.normal`` out of place + out-of-place add, as in MeZO's ``zo_perturb_parameters``), and each one's ratio
  to the copy floor.
* Bytes: one read + one write of the parameter bytes for the perturbations and the copy floor (so GB/s are
  *effective* bandwidths, directly comparable); one read of the ``[B, P]`` per-example gradients plus one fp32 write
  of ``P`` for ``clip_and_noise_``.
* The extra peak memory of each perturbation over the parameters: ``torch.cuda.max_memory_allocated`` growth on
  CUDA, peak-RSS growth on the CPU (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``).

Examples::

    python benchmarks/kernels.py --device cpu --numel 16777216 --repeats 5 --threads 1
    python benchmarks/kernels.py --device cpu --backend triton --numel 262144 --repeats 2   # Triton interpreter
    python benchmarks/kernels.py --device cuda --model opt-1.3b --dtype bfloat16
    python benchmarks/kernels.py --device cuda --model lora-opt-1.3b          # many small tensors: launch-bound
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MODELS = {  # (hidden, layers, ffn, vocab, positions) of OPT-style decoders
    "opt-125m": (768, 12, 3072, 50272, 2050),
    "opt-350m": (1024, 24, 4096, 50272, 2050),
    "opt-1.3b": (2048, 24, 8192, 50272, 2050),
}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of an OPT-style decoder, or of rank-8 LoRA adapters on its q and v projections."""
    if name.startswith("lora-"):
        h, layers = MODELS[name[5:]][:2]
        return [shape for _ in range(layers * 2) for shape in ((8, h), (h, 8))]
    h, layers, ffn, vocab, pos = MODELS[name]
    shapes = [(vocab, h), (pos, h)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,)]  # q, k, v, out (+ biases), attention layer norm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]  # fc1, fc2 (+ biases), final layer norm
    return shapes + [(h,), (h,)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def extra_peak_bytes(fn, device: torch.device) -> int | None:
    """Peak memory of ``fn()`` above what is allocated before it (None where it cannot be measured)."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_kib("VmRSS")
        fn()
        return (_proc_kib("VmHWM") - base) * 1024
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--numel", type=int, nargs="+", help="sizes of the tensors (default: 2**24 on CPU)")
    size.add_argument("--model", choices=[*MODELS, *(f"lora-{m}" for m in MODELS)], help="model-sized tensor list")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="examples B of the clip_and_noise_ rows form")
    parser.add_argument("--clip-numel", type=int, default=None, help="P of clip_and_noise_ (default: all params)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy host)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (lazily, by the kernels)
    from custom_kernels import clip_and_noise_, offsets_for, perturb_

    dtype = getattr(torch, args.dtype)
    if args.model:
        shapes = model_shapes(args.model)
    else:
        shapes = [(n,) for n in (args.numel or [1 << 24])]
    params = [torch.zeros(s, dtype=dtype, device=device).normal_(0, 0.02) for s in shapes]
    offsets = offsets_for(params)
    numel = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    rw_bytes = 2 * param_bytes

    gen = torch.Generator(device="cpu").manual_seed(0)  # data only; the global RNG is left to the MeZO baseline
    clip_p = min(args.clip_numel or numel, numel)
    grads = torch.randn(args.batch, clip_p, generator=gen).to(device=device, dtype=dtype)
    coeffs = torch.rand(args.batch, generator=gen).to(device)
    out = torch.empty(clip_p, dtype=torch.float32, device=device)
    clip_bytes = grads.numel() * grads.element_size() + out.numel() * 4

    step = {"t": 0}

    def copy_floor():
        for p in params:
            p.add_(1.0)

    def single():
        step["t"] += 1
        perturb_(params, offsets, step["t"], 1e-3, backend=args.backend)

    def fused():
        step["t"] += 1
        perturb_(params, offsets, step["t"], 1e-3, seed2=step["t"] + 1, scale2=1e-3, decay=0.999, backend=args.backend)

    def mezo():  # MeZO large_models/trainer.py::zo_perturb_parameters (reseeds the global RNG, as MeZO does)
        step["t"] += 1
        torch.manual_seed(step["t"])
        for i, p in enumerate(params):
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            params[i] = p + 1e-3 * z

    def clip():
        step["t"] += 1
        clip_and_noise_(out, grads, coeffs, 1.0, seed=step["t"], backend=args.backend)

    # memory first (after one warm-up call each: imports, kernel compilation, allocator caches), then throughput
    for fn in (single, fused, mezo):
        fn()
    memory = {name: extra_peak_bytes(fn, device) for name, fn in (("single", single), ("fused", fused), ("mezo", mezo))}
    rows = [
        ("p.add_(1.0) (copy floor)", copy_floor, rw_bytes),
        ("perturb_ single stream", single, rw_bytes),
        ("perturb_ fused two streams + decay", fused, rw_bytes),
        ("MeZO torch.normal + out-of-place add", mezo, rw_bytes),
        (f"clip_and_noise_ rows (B={args.batch}, noise on)", clip, clip_bytes),
    ]
    results = [(name, timed(fn, device, args.repeats), nbytes) for name, fn, nbytes in rows]

    dev_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"device={device} ({dev_name})  backend={args.backend}  dtype={args.dtype}  torch={torch.__version__}")
    print(
        f"tensors={len(params)}  numel={numel:,}  parameter bytes={param_bytes / 2**20:.1f} MiB  "
        f"repeats={args.repeats} (median)"
    )
    print("bytes: one read + one write of the parameter bytes; clip_and_noise_: one read of the [B, P] grads + one")
    print(f"       fp32 write of P (P={clip_p:,})")
    floor = results[0][2] / results[0][1]
    print(f"{'op':44s} {'ms':>10s} {'GB/s':>9s} {'/ copy floor':>13s}")
    for name, seconds, nbytes in results:
        rate = nbytes / seconds
        print(f"{name:44s} {seconds * 1e3:10.3f} {rate / 1e9:9.2f} {rate / floor:13.3f}")
    how = "max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth"
    print(f"extra peak memory over the parameters ({how}):")
    for name, label in (("single", "perturb_ single"), ("fused", "perturb_ fused"), ("mezo", "MeZO perturbation")):
        value = memory[name]
        text = "n/a" if value is None else f"{value / 2**20:.2f} MiB ({value / param_bytes:.3f} x parameters)"
        print(f"  {label:20s} {text}")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "device": dev_name, "backend": args.backend, "dtype": args.dtype, "torch": torch.__version__,
            "model": args.model, "tensors": len(params), "numel": numel, "parameter_bytes": param_bytes,
            "ops": [{"op": name, "ms": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9,
                     "vs_copy_floor": nbytes / seconds / floor} for name, seconds, nbytes in results],
            "extra_peak_bytes": memory,
        }, indent=2))


if __name__ == "__main__":
    main()
