"""The Triton kernels on a CUDA GPU, compiled (not the interpreter), checked against their definitions.

The CPU test suite runs the kernels in Triton's interpreter; this script checks the compiled kernels on the GPU for
the properties the library relies on, at the sizes it uses, in fp32 and bf16:

* ``perturb_``: the stream is standard normal (mean, std, correlation of neighbours); +λz then −λz restores the
  tensor to within one ulp; the fused two-stream pass equals two single passes; a masked (sparse) pass equals the
  dense pass on the listed coordinates and leaves every other element bit-identical; the global RNG is untouched.
* ``clip_and_noise_``: the clipped sum (rows form and book-keeping factors form, overwrite and accumulate) equals the
  plain-torch reference; the noise has the requested std; the same seed gives the same noise.

Prints one line per check and writes ``--json``; exits 1 if any check fails, 2 if there is no CUDA GPU.

    python benchmarks/gpu_kernel_check.py --json gpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at magnitude ``x`` (an fp32 tensor): 2**floor(log2 x) * eps."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.clamp_min(info.tiny)))) * info.eps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements of the dense tensors")
    parser.add_argument("--cpu-interpreter", action="store_true",
                        help="check this script itself on the CPU in Triton's interpreter, at small sizes")
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.cpu_interpreter:
        if not interpret:
            print("gpu_kernel_check: --cpu-interpreter needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        dev, small = torch.device("cpu"), 16
    else:
        if interpret:
            print("gpu_kernel_check: TRITON_INTERPRET is set: unset it to check the compiled kernels", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("gpu_kernel_check: no CUDA GPU visible: nothing checked", file=sys.stderr)
            return 2
        dev, small = torch.device("cuda"), 1
    from custom_kernels import clip_and_noise_, offsets_for, perturb_

    n = args.numel // small
    rng_state = torch.cuda.get_rng_state if dev.type == "cuda" else (lambda d: torch.get_rng_state())
    results: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    # ---------------------------------------------------------------- perturb_: the stream
    z = torch.zeros(n, device=dev)
    perturb_([z], [0], 1234, 1.0, backend="triton")
    mean, std = float(z.double().mean()), float(z.double().std())
    corr = float(torch.corrcoef(torch.stack([z[:-1], z[1:]]).double())[0, 1])
    tol = 6 / n**0.5
    check("perturb_ stream is N(0,1)", abs(mean) < tol and abs(std - 1) < 2 * tol and abs(corr) < tol,
          f"mean {mean:.2e}, std {std:.6f}, lag-1 corr {corr:.2e} (n={n:,})")
    z2 = torch.zeros(n, device=dev)
    perturb_([z2], [0], 1234, 1.0, backend="triton")
    check("perturb_ stream is a function of the seed", torch.equal(z, z2), "two passes with one seed, bit-equal")
    r = torch.zeros(n, device=dev)
    perturb_([r], [0], 1234, 1.0, distribution="rademacher", backend="triton")
    signs_only = bool(((r == 1) | (r == -1)).all())
    lanes = float(r[: n // 32 * 32].double().view(-1, 32).mean(0).abs().max())
    check("perturb_ Rademacher stream is balanced ±1", signs_only and abs(float(r.double().mean())) < tol
          and lanes < 6 / (n // 32) ** 0.5, f"only ±1: {signs_only}, mean {float(r.double().mean()):.2e}, "
          f"largest mean at a bit position {lanes:.2e}")
    del r

    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).replace("torch.", "")
        gen = torch.Generator(device=dev).manual_seed(0)
        shapes = [(4096 // small, 1024), (1024,), (50272 // small, 768)]
        params = [torch.randn(s, generator=gen, device=dev).mul_(0.02).to(dtype) for s in shapes]
        offsets = offsets_for(params)
        before = [p.clone() for p in params]
        state = rng_state(dev)
        perturb_(params, offsets, 7, 1e-3, backend="triton")
        perturbed = [p.clone() for p in params]
        perturb_(params, offsets, 7, -1e-3, backend="triton")
        # within one ulp of the larger of |θ| and |θ + λz| (the roundings of the perturbed value and of the restore)
        ulp = max(
            float(((p.float() - b.float()).abs() / _ulp(torch.maximum(b.float().abs(), q.float().abs()), dtype)).max())
            for p, b, q in zip(params, before, perturbed)
        )
        check(f"perturb_ +λz −λz restores ({label})", ulp <= 1.0, f"max {ulp:.3f} ulp")
        check(f"perturb_ leaves the global RNG alone ({label})", torch.equal(state, rng_state(dev)),
              "RNG state unchanged")

        a = [p.clone() for p in before]
        b = [p.clone() for p in before]
        perturb_(a, offsets, 11, 2e-3, seed2=12, scale2=-1e-3, decay=0.999, backend="triton")
        for p in b:
            p.mul_(0.999)
        perturb_(b, offsets, 11, 2e-3, backend="triton")
        perturb_(b, offsets, 12, -1e-3, backend="triton")
        err = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
        # fp32: rounding of the separate passes; bf16: two roundings against one
        bound = 1e-6 if dtype == torch.float32 else 2 * 2**-8 * max(float(x.float().abs().max()) for x in a)
        check(f"perturb_ fused two streams = two single passes ({label})", err <= bound, f"max abs diff {err:.2e}")

        dense = [p.clone() for p in before]
        perturb_(dense, offsets, 21, 1e-2, backend="triton")
        idx = [torch.randperm(p.numel(), device=dev)[: p.numel() // 100].sort().values.to(torch.int32) for p in before]
        sparse = [p.clone() for p in before]
        perturb_(sparse, offsets_for(sparse, idx), 21, 1e-2, indices=idx, backend="triton")
        untouched = all(
            torch.equal(s.view(-1)[torch.isin(torch.arange(s.numel(), device=dev), i.long(), invert=True)],
                        b.view(-1)[torch.isin(torch.arange(b.numel(), device=dev), i.long(), invert=True)])
            for s, b, i in zip(sparse, before, idx)
        )
        moved = all(not torch.equal(s.view(-1)[i.long()], b.view(-1)[i.long()]) for s, b, i in zip(sparse, before, idx))
        check(f"perturb_ masked pass touches only the listed coordinates ({label})", untouched and moved,
              "others bit-identical, listed ones moved")
        del dense

    # ---------------------------------------------------------------- clip_and_noise_
    gen = torch.Generator(device=dev).manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).replace("torch.", "")
        grads = torch.randn(8, (1 << 20) // small, generator=gen, device=dev).to(dtype)
        coeffs = torch.rand(8, generator=gen, device=dev)
        outs = {}
        for backend in ("triton", "torch"):
            out = torch.full(((1 << 20) // small,), 0.5, device=dev)
            clip_and_noise_(out, grads, coeffs, accumulate=True, backend=backend)
            outs[backend] = out
        err = float((outs["triton"] - outs["torch"]).abs().max())
        check(f"clip_and_noise_ rows form = reference ({label}, accumulate)", err < 1e-4, f"max abs diff {err:.2e}")
        a = torch.randn(8, 128 // small, 768 // small, generator=gen, device=dev).to(dtype)
        g = torch.randn(8, 128 // small, 3072 // small, generator=gen, device=dev).to(dtype)
        outs = {}
        for backend in ("triton", "torch"):
            out = torch.empty(g.shape[-1] * a.shape[-1], device=dev)
            clip_and_noise_(out, (a, g), coeffs, backend=backend)
            outs[backend] = out
        rel = float((outs["triton"] - outs["torch"]).norm() / outs["torch"].norm())
        check(f"clip_and_noise_ factors form = reference ({label})", rel < (1e-5 if dtype == torch.float32 else 1e-2),
              f"relative error {rel:.2e}")
    m = (1 << 22) // small
    zeros = torch.zeros(1, m, device=dev)
    out = torch.empty(m, device=dev)
    clip_and_noise_(out, zeros, torch.ones(1, device=dev), 3.0, seed=99, offset=1 << 20, backend="triton")
    std = float(out.double().std())
    check("clip_and_noise_ noise std", abs(std / 3.0 - 1) < 6 / m**0.5, f"std {std:.5f} for 3.0")
    again = torch.empty(m, device=dev)
    clip_and_noise_(again, zeros, torch.ones(1, device=dev), 3.0, seed=99, offset=1 << 20, backend="triton")
    check("clip_and_noise_ noise is a function of (seed, offset)", torch.equal(out, again), "bit-equal")

    failed = [r["check"] for r in results if not r["ok"]]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    summary = {"device": name, "torch": torch.__version__, "checks": results,
               "failed": failed}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - the kernels above needed it
        summary["triton"] = None
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"{len(results) - len(failed)}/{len(results)} checks passed on {summary['device']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
