"""``max_physical_batch_size=M``: logical (Poisson) batches processed in chunks of at most M examples, with the
update, the noise, the accounting and the callbacks of one step per logical batch."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import BatchEncoding

from lightning_dp import DPSGDStrategy, DPZeroStrategy, PerSampleLossError, UnsafeSettingError
from lightning_dp.mechanisms.chunks import chunk_sizes, split_batch, with_batch

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
N, T, VOCAB = 64, 5, 16
B = 8  # the DataLoader's batch size: the expected size of the Poisson batches


# ---------------------------------------------------------------------------------------------- the chunking helper
def test_chunk_sizes():
    assert chunk_sizes(7, 3) == [3, 3, 1]
    assert chunk_sizes(6, 3) == [3, 3]
    assert chunk_sizes(6, 6) == chunk_sizes(6, 60) == chunk_sizes(6, None) == [6]
    assert chunk_sizes(0, 3) == chunk_sizes(0, None) == []
    with pytest.raises(ValueError, match="max_size"):
        chunk_sizes(4, 0)


Pair = collections.namedtuple("Pair", ["x", "y"])


def test_split_batch_keeps_types_and_passes_other_entries_unchanged():
    x, y = torch.arange(14).view(7, 2), torch.arange(7)
    scale = torch.tensor(2.0)
    enc = BatchEncoding({"input_ids": x, "labels": y})
    for batch in ({"x": x, "y": y, "scale": scale, "name": "a"}, (x, [y, "a"]), Pair(x, y), enc):
        chunks = split_batch(batch, 7, 3)
        assert [n for _, n in chunks] == [3, 3, 1]
        for (chunk, n), start in zip(chunks, (0, 3, 6)):
            assert type(chunk) is type(batch)
            if isinstance(batch, dict):
                assert torch.equal(chunk["x"], x[start:start + n]) and torch.equal(chunk["y"], y[start:start + n])
                assert chunk["scale"] is scale and chunk["name"] == "a"
            elif isinstance(batch, BatchEncoding):
                assert torch.equal(chunk.input_ids, x[start:start + n])
                assert torch.equal(chunk["labels"], y[start:start + n])
            elif isinstance(batch, Pair):
                assert torch.equal(chunk.x, x[start:start + n]) and torch.equal(chunk.y, y[start:start + n])
            else:
                assert type(chunk[1]) is list and chunk[1][1] == "a"
                assert torch.equal(chunk[0], x[start:start + n]) and torch.equal(chunk[1][0], y[start:start + n])
    # one chunk: the batch itself, untouched
    batch = {"x": x, "y": y}
    assert split_batch(batch, 7, 7)[0][0] is batch and split_batch(batch, 7, None) == [(batch, 7)]


def test_split_batch_refuses_a_tensor_that_is_not_batch_first():
    with pytest.raises(PerSampleLossError, match=r"shape \(1, 5\).*not the batch's 7 examples"):
        split_batch({"x": torch.zeros(7, 5), "position_ids": torch.zeros(1, 5)}, 7, 3)


def test_with_batch_replaces_the_batch_argument():
    assert with_batch(("b", 3), {}, "c") == (("c", 3), {})
    assert with_batch((), {"batch": "b", "batch_idx": 3}, "c") == ((), {"batch": "c", "batch_idx": 3})


# ---------------------------------------------------------------------------------------------- a small transformer
class Tokens(Dataset):
    def __init__(self, n: int = N, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=g)
        self.labels = (self.ids.sum(1) % 3).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def collate(kind: str):
    def as_kind(samples):
        batch = torch.utils.data.default_collate(samples)
        if kind == "dict":
            return batch
        if kind == "encoding":
            return BatchEncoding(batch)
        return (batch["input_ids"], batch["labels"])

    return as_kind


class TinyTransformer(L.LightningModule):
    """Embedding + LayerNorm + Linear on [B, T, d] + head; per-example losses; counts its optimizer steps."""

    def __init__(self, d: int = 8, classes: int = 3, lr: float = 0.5, dropout: float = 0.0, zero_loss: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, classes)
        self.lr = lr
        self.zero_loss = zero_loss
        self.optimizer_steps = 0
        self.forward_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        ids, y = (batch["input_ids"], batch["labels"]) if not isinstance(batch, tuple) else batch
        self.forward_sizes.append(int(ids.shape[0]))
        h = torch.tanh(self.mix(self.norm(self.emb(ids))))
        logits = self.head(self.drop(h).mean(1))
        losses = F.cross_entropy(logits, y, reduction="none")
        if self.zero_loss:  # a gradient of exactly zero: the released gradient is the noise alone
            losses = 0.0 * logits.sum(1)
        return {"per_sample_loss": losses, "loss": losses.mean(), "extra": int(ids.shape[0])}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)

        def count(*_):
            self.optimizer_steps += 1

        optimizer.register_step_post_hook(count)
        return optimizer


def flat(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Recorder(L.Callback):
    """What the callbacks see: one entry per training step."""

    def __init__(self):
        self.grads, self.params, self.sizes, self.losses, self.clipped_sums = [], [], [], [], []
        self.calls = collections.Counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls["before_backward"] += 1

    def on_after_backward(self, trainer, pl_module):
        self.calls["after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls["before_optimizer_step"] += 1
        strategy = trainer.strategy
        if isinstance(strategy, DPSGDStrategy):
            self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in pl_module.parameters()]))
            self.sizes.append(strategy.last_step.num_examples)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls["train_batch_end"] += 1
        self.losses.append(float(outputs["loss"]))
        self.params.append(flat(pl_module))
        if isinstance(trainer.strategy, DPZeroStrategy):
            self.sizes.append(trainer.strategy.last_step.num_examples)
            self.clipped_sums += [r.clipped_sum for r in trainer.strategy.last_steps]


def run(strategy, steps=4, batch_size=B, kind="dict", model=None):
    model = model or TinyTransformer()
    rec = Recorder()
    trainer = L.Trainer(strategy=strategy, callbacks=[rec], **trainer_kwargs(max_steps=steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(Tokens(), batch_size=batch_size, collate_fn=collate(kind)))
    return model, rec


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- exactness (σ = 0)
@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_dpsgd_update_does_not_depend_on_the_physical_batch_size(clipping):
    def strategy(m):
        return DPSGDStrategy(noise_multiplier=0.0, clip=0.3, clipping=clipping, sampling_seed=2,
                             max_physical_batch_size=m)

    steps = 4
    ref_model, ref = run(strategy(None), steps=steps)
    assert max(ref.sizes) >= B + 1 and min(ref.sizes) >= 2  # batches larger than B: M = B - 1, B split them
    for m in (1, 3, B - 1, B, 10 * B):
        model, rec = run(strategy(m), steps=steps)
        assert rec.sizes == ref.sizes
        for got, want in zip(rec.grads, ref.grads):
            close(got, want)
        close(flat(model), flat(ref_model))
        for got, want in zip(rec.losses, ref.losses):  # the logged loss: the mean over the whole logical batch
            assert got == pytest.approx(want, rel=1e-5)
        # the user's training_step saw chunks of at most M examples, covering each batch exactly once
        assert max(model.forward_sizes) <= m and sum(model.forward_sizes) == sum(ref.sizes)
        assert rec.calls == ref.calls


@pytest.mark.parametrize("num_directions", [1, 2])
def test_dpzero_update_does_not_depend_on_the_physical_batch_size(num_directions):
    def strategy(m):
        return DPZeroStrategy(noise_multiplier=0.0, clip=0.05, zo_eps=1e-2, seed=5, sampling_seed=2,
                              num_directions=num_directions, max_physical_batch_size=m)

    # float64: a finite difference over λ amplifies the float32 rounding of the losses (which depends on how many
    # rows a matrix product has) to ~1e-4 relative; the perturbation ±λz itself is the same in every run
    steps = 4
    ref_model, ref = run(strategy(None), steps=steps, model=TinyTransformer().double())
    assert max(ref.sizes) >= B + 1
    for m in (1, 3, B - 1, B, 10 * B):
        model, rec = run(strategy(m), steps=steps, model=TinyTransformer().double())
        assert rec.sizes == ref.sizes
        for got, want in zip(rec.params, ref.params):
            close(got, want)
        for got, want in zip(rec.losses, ref.losses):
            assert got == pytest.approx(want, rel=1e-5)
        # 2 probes per direction per chunk
        assert sum(model.forward_sizes) == 2 * num_directions * sum(ref.sizes) and max(model.forward_sizes) <= m
    assert not torch.equal(flat(ref_model), ref.params[0])  # it trained


@pytest.mark.parametrize("kind", ["dict", "encoding", "tuple"])
def test_batch_types_are_kept(kind):
    def strategy(m):
        return DPSGDStrategy(noise_multiplier=0.0, clip=0.3, sampling_seed=3, max_physical_batch_size=m)

    ref_model, _ = run(strategy(None), steps=2, kind=kind)
    model, _ = run(strategy(3), steps=2, kind=kind)
    close(flat(model), flat(ref_model))


@pytest.mark.parametrize("method", ["bk", "ghost", "dpzero"])
def test_empty_batches_and_partial_chunks(method):
    """Batch size 2 of 64: some Poisson batches are empty, some hold 3 or 4 examples (M = 2: a partial chunk)."""

    def strategy(m):
        if method == "dpzero":
            return DPZeroStrategy(noise_multiplier=0.0, clip=0.05, zo_eps=1e-2, seed=5, sampling_seed=3,
                                  max_physical_batch_size=m)
        return DPSGDStrategy(noise_multiplier=0.0, clip=0.3, sampling_seed=3, max_physical_batch_size=m,
                             clipping=method)

    ref_model, ref = run(strategy(None), steps=12, batch_size=2, model=TinyTransformer().double())
    assert 0 in ref.sizes and 3 in ref.sizes  # empty batches, and a batch of 3 = chunks of 2 + 1
    model, rec = run(strategy(2), steps=12, batch_size=2, model=TinyTransformer().double())
    assert rec.sizes == ref.sizes and rec.calls == ref.calls
    close(flat(model), flat(ref_model))
    assert [loss == 0.0 for loss in rec.losses] == [n == 0 for n in rec.sizes]


def test_dropout_same_replays_each_chunk_masks_at_both_probes():
    """dropout="same" with σ = 0, λ → the update is the clipped directional derivative of each example's loss under
    its own masks: chunks that replayed the wrong state (another chunk's, or none) would give differences of
    unrelated masks, i.e. |s_i| ~ (dropout noise) / 2λ, far above the clip, with λ small."""
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=1e3, zo_eps=1e-3, seed=5, sampling_seed=3, dropout="same",
                              max_physical_batch_size=3)
    _, rec = run(strategy, steps=4, model=TinyTransformer(dropout=0.5))
    assert max(rec.sizes) > 3 and max(abs(s) for s in rec.clipped_sums) < 50, rec.clipped_sums


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_first_step_check_still_runs_with_chunks(clipping):
    class Functional(TinyTransformer):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            extra = F.linear(self.emb(batch["input_ids"]).mean(1), self.head.weight).sum(1)  # outside `head`
            return {**out, "per_sample_loss": out["per_sample_loss"] + extra}

    strategy = DPSGDStrategy(noise_multiplier=0.0, clip=0.3, sampling_seed=2, max_physical_batch_size=3,
                             clipping=clipping)
    with pytest.raises(Exception, match=r"'head.weight'.*used outside the module"):
        run(strategy, steps=1, model=Functional())


def test_accumulation_refusals_point_to_physical_batches():
    with pytest.raises(UnsafeSettingError, match=r"max_physical_batch_size="):
        L.Trainer(strategy=DPSGDStrategy(noise_multiplier=1.0), **trainer_kwargs(accumulate_grad_batches=2)).fit(
            TinyTransformer(), DataLoader(Tokens(), batch_size=B))

    class Accumulate(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.accumulate_grad_batches = 2

    trainer = L.Trainer(strategy=DPZeroStrategy(noise_multiplier=1.0), callbacks=[Accumulate()], **trainer_kwargs())
    with pytest.raises(UnsafeSettingError, match=r"became 2 during training.*max_physical_batch_size="):
        trainer.fit(TinyTransformer(), DataLoader(Tokens(), batch_size=B))


# ---------------------------------------------------------------------------------------------- once per logical step
def test_noise_accounting_and_callbacks_once_per_logical_step():
    sigma, clip, steps = 1.0, 1.0, 12
    strategy = DPSGDStrategy(noise_multiplier=sigma, clip=clip, sampling_seed=3, max_physical_batch_size=1)
    model, rec = run(strategy, steps=steps, model=TinyTransformer(lr=0.0, zero_loss=True))
    assert sum(model.forward_sizes) == sum(rec.sizes) and max(rec.sizes) > 4  # many chunks per step
    # zero gradient: the released gradient is the noise / E[B]; noise per chunk would have √(chunks) its std
    noise = torch.cat(rec.grads).double() * B
    assert noise.numel() > 1000
    assert 0.85 * sigma * clip < noise.std().item() < 1.15 * sigma * clip
    # accounting, optimizer, callbacks: once per logical step
    assert strategy.accountant.history == [(sigma, B / N, steps)] and strategy.privacy_report()["steps"] == steps
    assert model.optimizer_steps == steps
    assert rec.calls == {"before_backward": steps, "after_backward": steps, "before_optimizer_step": steps,
                         "train_batch_end": steps}


class NoiseRecorder(L.Callback):
    def __init__(self):
        self.noise, self.sizes, self.steps = [], [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.noise += [r.noise for r in trainer.strategy.last_steps]
        self.sizes.append(trainer.strategy.last_step.num_examples)


def test_dpzero_one_noise_draw_per_direction_per_step():
    """A zero loss difference: each released scalar is the noise alone, std σC (σC·√chunks if drawn per chunk)."""
    sigma, clip, steps = 1.0, 2.0, 60
    strategy = DPZeroStrategy(noise_multiplier=sigma, clip=clip, sampling_seed=3, max_physical_batch_size=1,
                              num_directions=2)
    rec = NoiseRecorder()
    trainer = L.Trainer(strategy=strategy, callbacks=[rec], **trainer_kwargs(max_steps=steps))
    model = TinyTransformer(lr=0.0, zero_loss=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(Tokens(), batch_size=B, collate_fn=collate("dict")))
    noise = torch.tensor(rec.noise, dtype=torch.float64)
    assert noise.numel() == 2 * steps
    assert 0.75 * sigma * clip < noise.std().item() < 1.3 * sigma * clip
    assert strategy.accountant.history == [(sigma / 2**0.5, B / N, steps)]
    assert model.optimizer_steps == steps and rec.steps == steps
    assert sum(model.forward_sizes) == 2 * 2 * sum(rec.sizes) and max(rec.sizes) > 4  # many chunks per step


# ---------------------------------------------------------------------------------------------- memory
def _child_env(**extra):
    # a child that inherits LOCAL_RANK & co. from an in-process Trainer believes an external launcher started it
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def _peaks(method, m, batch):
    env = _child_env(MALLOC_MMAP_THRESHOLD_="65536")  # large blocks come from mmap and go back to the OS when freed
    env.pop("TRITON_INTERPRET", None)  # the torch reference kernels on CPU
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "physical_batch_memory.py"), method, str(m), str(batch)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chunked, whole = (float(v) for v in proc.stdout.strip().splitlines()[-1].split())
    return chunked, whole


@pytest.mark.parametrize("method, batch", [("bk", 256), ("dpzero", 512)])
def test_peak_memory_follows_the_physical_batch(method, batch):
    """Batches of 64 tokens, width 256: the activations dominate (DP-SGD keeps them for the backward, DPZero only
    a few layers' at a time, hence its larger batch); M = 32 needs a fraction of them (1/8 or 1/16 plus overheads:
    well under 0.3 of the unchunked peak, also on the first step, whose checked backward differs)."""
    chunked, whole = _peaks(method, 32, batch)
    assert whole > 40 and chunked < 0.3 * whole, (chunked, whole)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp(tmp_path, name, method, devices, batch_size, m, steps=10):
    out = str(tmp_path / name)
    env = _child_env()
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "ddp_physical_batch.py"), "--method", method, "--devices", str(devices),
         "--batch-size", str(batch_size), "--steps", str(steps), "--max-physical-batch-size", str(m), "--out", out],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(devices)]


def _per_step(seen, steps, probes):
    """This rank's examples per step from the chunk sizes its training_step saw (each chunk ``probes`` times)."""
    counts = [0] * steps
    for step, n in seen:
        counts[step] += n
    return [c // probes for c in counts]


@pytest.mark.parametrize("method", ["bk", "dpzero"])
def test_two_ranks_with_chunks_match_one_process_without(tmp_path, method):
    """2 ranks (gloo) of Poisson shards of ~2 examples in chunks of M = 1 (some shards empty, some of 3-4 examples)
    give the parameters of one process on the whole Poisson batch in one pass."""
    steps, probes = 10, 2 if method == "dpzero" else 1
    r0, r1 = _ddp(tmp_path, "ddp", method, devices=2, batch_size=2, m=1, steps=steps)
    (single,) = _ddp(tmp_path, "single", method, devices=1, batch_size=4, m=0, steps=steps)
    shards = [_per_step(r["seen"], steps, probes) for r in (r0, r1)]
    assert [a + b for a, b in zip(*shards)] == _per_step(single["seen"], steps, probes)
    assert 0 in shards[0] + shards[1] and max(shards[0] + shards[1]) >= 3  # empty shards, several chunks
    assert max(n for _, n in r0["seen"] + r1["seen"]) == 1
    assert torch.equal(r0["params"], r1["params"])  # bit-identical ranks
    torch.testing.assert_close(r0["steps"], single["steps"], rtol=1e-5, atol=1e-6)
    assert r0["report"]["steps"] == single["report"]["steps"] == steps
    assert not torch.equal(single["steps"][0], single["steps"][-1])  # it trained
