"""DPSGDStrategy on 2 CPU ranks (gloo) through Lightning's own `ddp` launcher, run as a script in a subprocess (the
launcher re-executes the command per rank; inside pytest it would re-run pytest)."""

import os
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_dpsgd.py")


def _run(tmp_path, name, devices, batch_size, steps, noise_multiplier=0.0, lr=0.05, clipping="auto", extra=(),
         expect_ok=True):
    out = str(tmp_path / name)
    # a child that inherits LOCAL_RANK & co. from an in-process Trainer believes an external launcher started it
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--devices", str(devices), "--batch-size", str(batch_size), "--steps", str(steps),
         "--noise-multiplier", str(noise_multiplier), "--lr", str(lr), "--clipping", clipping, "--out", out, *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(devices)]


def test_two_ranks_match_one_process_and_noise_is_added_once(tmp_path):
    steps = 8
    r0, r1 = _run(tmp_path, "ddp", devices=2, batch_size=4, steps=steps)
    (single,) = _run(tmp_path, "single", devices=1, batch_size=8, steps=steps)
    assert r0["world_size"] == 2 and r0["report"]["sample_rate"] == single["report"]["sample_rate"] == 8 / 64
    assert r0["report"]["steps"] == r1["report"]["steps"] == steps
    # bit-identical private gradients and parameters on both ranks
    assert torch.equal(r0["grads"], r1["grads"]) and torch.equal(r0["params"], r1["params"])
    # the same global Poisson sample, hence the same private gradient, as one process
    assert [a + b for a, b in zip(r0["examples"], r1["examples"])] == single["examples"]
    torch.testing.assert_close(r0["grads"], single["grads"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r0["params"], single["params"], atol=1e-5, rtol=0)

    # σ = 1 with lr = 0 (same parameters and batches every step as the σ = 0 run with lr = 0): the difference is the
    # noise, σC / E[B] per coordinate; twice-added noise would be √2 larger
    sigma, clip, expected_b = 1.0, 1.0, 8.0
    clean, _ = _run(tmp_path, "clean", devices=2, batch_size=4, steps=steps, lr=0.0)
    n0, n1 = _run(tmp_path, "noisy", devices=2, batch_size=4, steps=steps, noise_multiplier=sigma, lr=0.0)
    assert torch.equal(n0["grads"], n1["grads"])
    assert n0["examples"] == clean["examples"]
    noise = (n0["grads"] - clean["grads"]).double() * expected_b
    assert noise.numel() > 1400  # the std estimate is within ~4% (3σ); √2 would be 41% off
    std = noise.std().item()
    assert 0.88 * sigma * clip < std < 1.12 * sigma * clip, std


def test_ghost_clipping_on_two_ranks_matches_book_keeping_in_one_process(tmp_path):
    """clipping="ghost" on 2 ranks: bit-identical ranks, and the same private gradients as bk in one process."""
    steps = 5
    r0, r1 = _run(tmp_path, "ghost", devices=2, batch_size=4, steps=steps, clipping="ghost")
    (single,) = _run(tmp_path, "bk", devices=1, batch_size=8, steps=steps, clipping="bk")
    assert r0["report"]["clipping"] == "ghost" and single["report"]["clipping"] == "bk"
    assert torch.equal(r0["grads"], r1["grads"]) and torch.equal(r0["params"], r1["params"])
    assert [a + b for a, b in zip(r0["examples"], r1["examples"])] == single["examples"]
    torch.testing.assert_close(r0["grads"], single["grads"], atol=1e-6, rtol=1e-5)


def test_ranks_with_different_training_set_sizes_are_refused(tmp_path):
    """q = B·W/N assumes one N: ranks holding different data are refused on every rank (no rank is left hanging)."""
    proc = _run(tmp_path, "uneven", devices=2, batch_size=4, steps=2, extra=("--uneven",), expect_ok=False)
    assert proc.returncode != 0
    assert "the training set size N differs across ranks (from 64 to 72)" in proc.stdout + proc.stderr
