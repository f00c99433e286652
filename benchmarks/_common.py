"""Shared helpers of the benchmarks: a small RoBERTa-style classifier, a fixed random batch, per-example losses,
peak-memory probes for CPU and CUDA, and a runner that measures each variant in its own child process.

Memory is always reported as the *growth* over a baseline taken when only the model, the batch and the libraries
are resident (the model's own memory is therefore excluded, as in "peak memory of a step vs. inference"):

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after ``reset_peak_memory_stats``.
* CPU: the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset by writing ``5`` to
  ``/proc/self/clear_refs``. The mark is exact (no sampling gaps). Where ``clear_refs`` cannot be written (not Linux,
  restricted container) a background thread samples the RSS every ~1 ms instead. The RSS only follows the live
  memory if glibc hands freed blocks back to the OS at once: start the measuring process with
  :data:`EXACT_MALLOC_ENV` (every block of 64 KiB or more is then mmapped and unmapped on free). Measured without it,
  the same inference forward grew the RSS by 44-76 MiB from one process to the next (what the allocator happened to
  keep from earlier steps); with it, by 44.1-44.3 MiB every time. That setting slows allocation-heavy code down
  (fresh pages are faulted in on every large allocation), so time in a process without it and measure memory in
  another one with it. ``PeakMemory.start`` also sets it at run time (``mallopt``) and calls ``malloc_trim(0)``,
  which helps but does not make a process started without it exact.

Each variant runs in a fresh child process (see :func:`run_child`), so one variant's allocator state, caches and
peaks never contaminate another's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MiB = float(1 << 20)

EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
"""Environment for a child process that measures CPU memory (glibc reads it at start-up; see the module docstring)."""

CACHING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
"""Environment for a timing child on the CPU that should allocate as a caching allocator does (CUDA's, jemalloc's):
glibc keeps freed blocks for reuse instead of handing them back to the OS, so a step does not pay the page faults
of re-touching fresh memory (with glibc's defaults a DP-SGD step of a BERT-base-wide encoder took ~220K minor faults
against ~80K for the non-private step, several tenths of a second of kernel time)."""


# ---------------------------------------------------------------------------------------------- model and data
@dataclass(frozen=True)
class ModelSpec:
    vocab: int = 30522
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    max_positions: int = 130


def build_model(spec: ModelSpec, device: str | torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized ``RobertaForSequenceClassification`` (2 labels, dropout probabilities as configured by
    default; every benchmark runs it in ``eval()`` mode, i.e. dropout off, as MeZO/DPZero probes do)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_positions,
        type_vocab_size=1,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(config).to(device)
    model.eval()
    return model


def make_batch(batch_size: int, seq_len: int, vocab: int, device: str | torch.device, seed: int = 1) -> dict:
    """Random token ids in ``[3, vocab)`` (no padding id), a full attention mask and random binary labels."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, vocab, (batch_size, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def per_example_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of each example, shape ``[B]`` (the DP contract)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def trainable_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def mezo_step(params: list[torch.Tensor], loss: Callable[[], torch.Tensor], seed: int, zo_eps: float,
              lr: float) -> None:
    """One step of MeZO's own ``zo_step`` + ``zo_update`` (princeton-nlp/MeZO large_models/trainer.py, weight decay
    0): global ``torch.manual_seed(seed)``, ``torch.normal`` per tensor, out-of-place ``p.data = p.data + ...``;
    passes +1, -2, +1 (restore), update. ``loss()`` is the batch's mean loss; run it under ``no_grad`` /
    ``inference_mode``."""

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * zo_eps

    perturb(1)
    loss1 = loss()
    perturb(-2)
    loss2 = loss()
    projected_grad = ((loss1 - loss2) / (2 * zo_eps)).item()
    perturb(1)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (projected_grad * z)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``perf_counter`` after the device has finished all queued work."""
    sync(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------- memory
def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _exact_malloc() -> None:
    """Make the RSS follow the live memory: blocks >= 64 KiB are mmapped (unmapped on free), and the free pages
    glibc had cached are returned to the OS. A no-op where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth over the moment :meth:`start` is called.

    ``start()`` frees what can be freed (``gc``; on CPU switches glibc to exact mode, see the module docstring; on
    CUDA empties the cache), records the baseline and resets the peak; ``stop()`` returns
    ``(baseline_bytes, peak_growth_bytes, method)``. Call it after the timed steps.
    """

    def __init__(self, device: torch.device, interval_s: float = 1e-3) -> None:
        self.device = device
        self.interval_s = interval_s
        self.method = ""
        self._thread: threading.Thread | None = None
        self._running = False
        self._peak = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        _exact_malloc()
        self.baseline = rss_bytes()
        if _reset_hwm():
            self.method = "VmHWM (kernel high-water mark)"
            return
        self.method = f"RSS sampled every {self.interval_s * 1e3:.0f} ms"
        self._peak = self.baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval_s)

    def stop(self) -> tuple[int, int, str]:
        if self.device.type == "cuda":
            sync(self.device)
            return self.baseline, torch.cuda.max_memory_allocated(self.device) - self.baseline, self.method
        if self._thread is None:
            peak = (_read_status_kib("VmHWM") or 0) * 1024
        else:
            self._running = False
            self._thread.join()
            peak = max(self._peak, rss_bytes())
        return self.baseline, max(0, peak - self.baseline), self.method


# ---------------------------------------------------------------------------------------------- child processes
RESULT_TAG = "@@RESULT@@ "


def emit_result(result: dict) -> None:
    """Print the child's result as one tagged JSON line (the parent ignores every other line)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script: str, argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``python script *argv`` (with ``env`` added to this process's environment) and return the JSON it
    emitted; raise with its output if it failed."""
    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"child {argv} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------- step benchmarks
def add_step_args(p, variants: tuple[str, ...], mem_steps: int) -> None:
    """The flags shared by the step benchmarks (``dpsgd_memory_speed.py``, ``zo_memory_speed.py``): device, model
    shape, batch, repetitions, threads, variants, output, and the internal ``--variant`` of a child process."""
    import argparse

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, round-robin")
    p.add_argument("--mem-steps", type=int, default=mem_steps, help="extra steps over which the peak memory is taken")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (CPU)")
    p.add_argument("--variants", default=",".join(variants), help=f"comma-separated subset of {','.join(variants)}")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant (child process)


def step_flags(args) -> list[str]:
    """The flags of :func:`add_step_args` that a parent forwards to its child processes."""
    return [
        f"--device={args.device}", f"--hidden={args.hidden}", f"--layers={args.layers}", f"--heads={args.heads}",
        f"--intermediate={args.intermediate}", f"--vocab={args.vocab}", f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
        f"--threads={args.threads}",
    ]


def step_model(args, device) -> tuple[ModelSpec, torch.nn.Module]:
    """The model of :func:`add_step_args`' shape flags, on ``device``."""
    spec = ModelSpec(hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                     vocab=args.vocab, max_positions=args.seq_len + 2)
    return spec, build_model(spec, device)


def load_average() -> float:
    """1-minute load average (-1 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0
