"""The largest OPT-shaped decoder on which each method can take ONE training step on this machine.

    python benchmarks/memory_at_scale.py                               # OPT-125M -> 350M -> 1.3B -> 2.7B, B=4, T=128
    python benchmarks/memory_at_scale.py --sizes 125m,350m --methods dpzero,mezo
    python benchmarks/memory_at_scale.py --sizes tiny,tiny2 --budget-gib 4     # seconds: what the tests run

Models have the shapes of the OPT checkpoints (``OPTConfig`` of OPT-125M/350M/1.3B/2.7B: hidden size, layers, heads,
FFN width, vocabulary 50272, tied input/output embeddings), random weights (nothing is downloaded), fp32, causal-LM
loss of random token ids averaged per sequence over its own tokens (:func:`lightning_dp.losses.causal_lm`). Every
method runs ONE step at ``--batch-size`` x ``--seq-len`` in its own fresh child process:

``adamw``    non-private: ``Trainer.fit`` (default strategy), ``torch.optim.AdamW``, fp32 weights + gradients + Adam
             state.
``dp-adam``  ours: ``Trainer.fit`` with ``DPSGDStrategy`` (book-keeping, default clipping), ``torch.optim.AdamW``.
``opacus``   Opacus's standard per-sample-gradient path: ``GradSampleModule`` (hooks, ``[B, *p.shape]`` per-sample
             gradients) + ``DPOptimizer`` over ``torch.optim.AdamW``, a plain loop (Opacus has no Lightning path).
``dpzero``   ours: ``Trainer.fit`` with ``DPZeroStrategy`` (two probes + update).
``mezo``     MeZO's step (princeton-nlp/MeZO ``large_models/trainer.py``, ``zo_step`` + ``zo_update``): global
             ``torch.manual_seed(seed)`` and ``torch.normal`` per tensor to regenerate z, out-of-place
             ``p.data = p.data + scale * z * eps``, four passes (+1, -2, +1 restore, update), a plain loop.

The DP methods use σ = 1 and fixed batches (``poisson_sampling=False``): the cost of a step does not depend on σ,
and Poisson sampling would make the batch size random.

The blocks are transformers' GPT-NeoX blocks (``GPTNeoXForCausalLM``: rotary positions, no position-embedding table),
not ``OPTForCausalLM``: OPT's decoder layer flattens the hidden states to ``[B*T, hidden]`` before ``fc1``/``fc2`` and
its ``OPTLearnedPositionalEmbedding`` is called with the attention mask instead of ids, so neither per-example
gradient hooks (ours: refused with an error naming ``fc1``; Opacus: a shape error) can attribute those layers'
gradients to examples. With the same shapes the parameter count is OPT's minus the 2050 x hidden position table
(and, at 350M, without OPT-350M's 512-wide embedding projection).

Memory is the child's ABSOLUTE peak resident set (``VmHWM`` of /proc/self/status; not ``ru_maxrss``, which Linux
carries from the parent into a child across fork + exec): libraries, Lightning, model,
optimizer state and the step, i.e. what has to fit in the machine. The model's parameter bytes are shown beside it.
Step time is the wall time of the one step (Lightning's ``on_train_batch_start`` -> ``on_train_batch_end`` for the
``Trainer`` rows); for ``dp-adam`` it is the first step of a fit, the one whose gradient is also checked against
autograd's.

Safety on a shared machine: sizes run in increasing order. Before a size is launched its peak is PREDICTED from the
method's own measurements at the smaller sizes (two or more: a least-squares line ``peak = a + b * params``, i.e.
fixed cost plus bytes per parameter, which over-estimates the activations that grow slower than the parameter count;
one: the measured bytes per parameter above the child's pre-model RSS; none: a prior of ``PRIOR_BYTES_PER_PARAM`` plus
1 GiB). A size runs only if the prediction is below ``--budget-gib`` and below ``MemAvailable`` minus 2 GiB; else the
row says ``predicted X GiB > budget: not run`` and the larger sizes of that method are skipped too. The child also
sets ``RLIMIT_AS`` (its address space at start-up plus the budget) as a backstop: a refused allocation, a
``MemoryError`` or a kill is reported as ``does not fit``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GiB = float(1 << 30)
RESULT_TAG = "@@RESULT@@ "

# name: (hidden, layers, heads, ffn, vocab): the shapes of the OPT checkpoints' configs (OPTConfig)
SIZES = {
    "tiny": (32, 2, 2, 64, 512),
    "tiny2": (64, 2, 2, 128, 512),
    "125m": (768, 12, 12, 3072, 50272),
    "350m": (1024, 24, 16, 4096, 50272),
    "1.3b": (2048, 24, 32, 8192, 50272),
    "2.7b": (2560, 32, 32, 10240, 50272),
}
METHODS = ("adamw", "dp-adam", "opacus", "dpzero", "mezo")
HOW = {
    "adamw": "`Trainer.fit`, AdamW",
    "dp-adam": "`Trainer.fit` + `DPSGDStrategy` (bk), AdamW",
    "opacus": "`GradSampleModule` + `DPOptimizer`(AdamW)",
    "dpzero": "`Trainer.fit` + `DPZeroStrategy`",
    "mezo": "MeZO 4-pass, plain loop",
}
# prior bytes per parameter (fp32): weights + gradient + 2 Adam moments; + B per-sample gradients (Opacus); weights
PRIOR_BYTES_PER_PARAM = {"adamw": 16, "dp-adam": 20, "opacus": 16 + 4 * 4 + 4, "dpzero": 4, "mezo": 4}
LR = 1e-6
ZO_EPS = 1e-3


# ---------------------------------------------------------------------------------------------- child
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping or killing anyone)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def build_model(size: str):
    """A randomly initialized causal LM of the size's OPT shape, tied input/output embeddings as in OPT, on GPT-NeoX
    blocks (see the module docstring for why not ``OPTForCausalLM`` itself)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, ffn, vocab = SIZES[size]
    config = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=True,
    )
    return GPTNeoXForCausalLM(config)


def child_main(args) -> dict:
    import lightning.pytorch as L
    import torch
    import torch.nn.functional as F  # noqa: F401 - imported before the limit like everything the step needs
    from _common import mezo_step  # (benchmarks/ is on the path of a script and of its test)
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: F401 - mapped before the limit

    from lightning_dp import DPSGDStrategy, DPZeroStrategy, losses

    if args.method == "opacus":
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

    torch.set_num_threads(args.threads)
    # backstop: the address space may grow by the budget from here on (libraries are mapped already)
    limit = _status_kib("VmSize") * 1024 + int(args.as_headroom_gib * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before_model = _status_kib("VmRSS") * 1024

    torch.manual_seed(0)
    model = build_model(args.size)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len))
    after_model = _status_kib("VmRSS") * 1024

    def lm_losses(m, x):
        return losses.causal_lm(m(input_ids=x).logits, x)

    step_time: list[float] = []
    if args.method in ("adamw", "dp-adam", "dpzero"):
        private = args.method != "adamw"

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model

            def training_step(self, batch, batch_idx):
                per_example = lm_losses(self.model, batch[0])
                return per_example if private else per_example.mean()

            def configure_optimizers(self):
                params = [p for p in self.parameters() if p.requires_grad]
                if args.method == "dpzero":
                    return torch.optim.SGD(params, lr=LR)
                return torch.optim.AdamW(params, lr=LR)

        class Clock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step_time.append(time.perf_counter() - self.start)

        strategy = "auto"
        if args.method == "dp-adam":
            strategy = DPSGDStrategy(noise_multiplier=1.0, poisson_sampling=False)
        elif args.method == "dpzero":
            strategy = DPZeroStrategy(noise_multiplier=1.0, poisson_sampling=False)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[Clock()],
        )
        data = DataLoader(TensorDataset(ids.repeat(4, 1)), batch_size=args.batch_size)
        trainer.fit(Module(), train_dataloaders=data)
        if len(step_time) != 1:
            raise RuntimeError(f"expected one training step, the Trainer ran {len(step_time)}")
    elif args.method == "opacus":
        model.train()
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR),
                          noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=args.batch_size,
                          loss_reduction="mean")
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        lm_losses(gsm, ids).mean().backward()
        opt.step()
        step_time.append(time.perf_counter() - start)
    elif args.method == "mezo":
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        start = time.perf_counter()
        with torch.inference_mode():
            mezo_step(params, lambda: lm_losses(model, ids).mean(), 1_000_003, ZO_EPS, LR)
        step_time.append(time.perf_counter() - start)
    else:
        raise ValueError(f"unknown method {args.method!r}")
    peak = peak_rss_bytes()
    return {"params": n_params, "param_bytes": param_bytes, "rss_before_model": before_model,
            "rss_after_model": after_model, "peak_rss": peak, "step_s": step_time[0]}


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (its own, unlike ``ru_maxrss`` after fork + exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024  # kB


def run_child_process(args, method: str, size: str, headroom_gib: float) -> dict:
    """One (method, size) in a fresh process; a failure is a row, never an exception."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", f"--method={method}", f"--size={size}",
            f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}", f"--threads={args.threads}",
            f"--as-headroom-gib={headroom_gib}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["child_wall_s"] = wall
            return out
    if proc.returncode < 0:
        return {"status": "does not fit", "reason": f"killed by signal {-proc.returncode}", "child_wall_s": wall}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": "failed", "reason": f"exit {proc.returncode}: {tail[0][:200]}", "child_wall_s": wall}


def child_entry(args) -> None:
    try:
        out = child_main(args)
        out["status"] = "ok"
    except MemoryError as err:
        out = {"status": "does not fit", "reason": f"MemoryError: {err}"[:200]}
    except RuntimeError as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "can't allocate memory" in msg or "DefaultCPUAllocator" in msg:
            out = {"status": "does not fit", "reason": f"allocation refused: {msg}"[:200]}
        else:
            raise
    out["peak_rss"] = out.get("peak_rss") or peak_rss_bytes()
    print(RESULT_TAG + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- prediction
def count_params(size: str) -> int:
    """Parameter count of a size, from the model built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = build_model(size)
    return sum(p.numel() for p in model.parameters())


def predict_peak(method: str, params: int, measured: list[dict]) -> tuple[float, str]:
    """Predicted absolute peak RSS (bytes) of ``method`` on a model of ``params`` parameters, and its basis.

    Args:
        method: one of :data:`METHODS`.
        params: the parameter count of the size to predict.
        measured: this method's successful rows at smaller sizes (``params``, ``peak_rss``, ``rss_before_model``).

    Returns:
        ``(bytes, basis)``: the prediction and a short text saying how it was made.
    """
    if len(measured) >= 2:
        xs = [float(r["params"]) for r in measured]
        ys = [float(r["peak_rss"]) for r in measured]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - slope * mx
        return fixed + slope * params, f"fit of {len(measured)} sizes: {fixed / GiB:.2f} GiB + {slope:.1f} B/param"
    if len(measured) == 1:
        r = measured[0]
        per_param = (r["peak_rss"] - r["rss_before_model"]) / r["params"]
        return r["rss_before_model"] + per_param * params, f"1 size: {per_param:.1f} B/param above pre-model RSS"
    prior = PRIOR_BYTES_PER_PARAM[method]
    return GiB + prior * params, f"prior: 1 GiB + {prior} B/param"


# ---------------------------------------------------------------------------------------------- parent
def machine() -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"nproc = {os.cpu_count()}, total memory = {total / GiB:.1f} GiB, MemAvailable at start = " \
           f"{mem_available_bytes() / GiB:.1f} GiB, load average {os.getloadavg()[0]:.1f}"


def run_all(args) -> list[dict]:
    rows = []
    methods = args.methods.split(",")
    sizes = args.sizes.split(",")
    unknown = [m for m in methods if m not in METHODS] + [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown method or size: {unknown} (methods: {METHODS}, sizes: {tuple(SIZES)})")
    n_params = {s: count_params(s) for s in sizes}
    sizes.sort(key=n_params.get)
    budget = args.budget_gib * GiB
    for method in methods:
        measured: list[dict] = []
        stopped = None
        for size in sizes:
            row = {"method": method, "size": size, "params": n_params[size], "param_bytes": 4 * n_params[size]}
            predicted, basis = predict_peak(method, n_params[size], measured)
            row.update(predicted=predicted, basis=basis)
            available = mem_available_bytes() - 2 * GiB
            if stopped:
                row.update(status="not run", reason=f"a smaller size was {stopped}")
            elif predicted > budget:
                row.update(status="not run", reason=f"predicted {predicted / GiB:.1f} GiB > budget "
                                                    f"{args.budget_gib:g} GiB ({predicted / budget:.1f}x)")
            elif predicted > available:
                row.update(status="not run", reason=f"predicted {predicted / GiB:.1f} GiB > MemAvailable - 2 GiB "
                                                    f"= {available / GiB:.1f} GiB now")
            else:
                row.update(run_child_process(args, method, size, args.as_headroom_gib or args.budget_gib))
            if row["status"] == "ok":
                measured.append(row)
            else:
                stopped = stopped or row["status"]
            print(f"# {method} {size}: {row['status']} {row.get('reason', '')}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], args) -> str:
    lines = [
        f"Command: `python benchmarks/memory_at_scale.py {' '.join(args.argv)}`",
        "",
        f"Machine: {machine()}; torch threads = {args.threads}; B = {args.batch_size}, T = {args.seq_len}, fp32; "
        f"budget {args.budget_gib:g} GiB per child.",
        "",
        "| method | how | size | params | param bytes | predicted peak (basis) | peak RSS | step time | result |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        peak = f"{r['peak_rss'] / GiB:.2f} GiB" if r.get("peak_rss") and r["status"] == "ok" else "—"
        step = f"{r['step_s']:.1f} s" if r.get("step_s") is not None else "—"
        result = "fits" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines.append(
            f"| {r['method']} | {HOW[r['method']]} | {r['size']} | {r['params'] / 1e6:,.1f} M | "
            f"{r['param_bytes'] / GiB:.2f} GiB | {r['predicted'] / GiB:.2f} GiB ({r['basis']}) | {peak} | {step} | "
            f"{result} |"
        )
    lines += ["", "| method | largest size that fits | first size that does not | short by |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        fits = [r for r in mine if r["status"] == "ok"]
        short = next((r for r in mine if r["status"] != "ok"), None)
        best = f"{fits[-1]['size']} ({fits[-1]['peak_rss'] / GiB:.2f} GiB)" if fits else "none"
        if short is None:
            first, by = "— (all sizes fit)", "—"
        else:
            first = short["size"]
            by = f"predicted {short['predicted'] / GiB:.1f} GiB vs budget {args.budget_gib:g} GiB " \
                 f"({short['predicted'] / (args.budget_gib * GiB):.1f}x); {short['status']}"
        lines.append(f"| {method} | {best} | {first} | {by} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="125m,350m,1.3b,2.7b", help=f"comma-separated, of {','.join(SIZES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--budget-gib", type=float, default=18.0, help="largest predicted peak RSS that is launched")
    p.add_argument("--as-headroom-gib", type=float, default=None,
                   help="RLIMIT_AS of a child: its address space at start-up plus this (default: the budget)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child-timeout", type=float, default=1800.0, help="seconds before a child is killed")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.child:
        child_entry(args)
        return
    rows = run_all(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows, args))


if __name__ == "__main__":
    main()
