"""DPZero on 2 CPU ranks (gloo) through Lightning's own `ddp` launcher, run as a script in a subprocess (the
launcher re-executes the command per rank; inside pytest it would re-run pytest)."""

import os
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_dpzero.py")


def _run(tmp_path, name, devices, batch_size, steps, noise_multiplier=0.0, sparse=False, num_directions=1):
    out = str(tmp_path / name)
    # an in-process Trainer leaves LOCAL_RANK/MASTER_PORT/... in os.environ; a child that inherits LOCAL_RANK believes
    # an external launcher started it and never launches its peers
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--devices", str(devices), "--batch-size", str(batch_size), "--steps", str(steps),
         "--noise-multiplier", str(noise_multiplier), "--sparse", str(int(sparse)),
         "--num-directions", str(num_directions), "--out", out],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(devices)]


def test_two_ranks_match_one_process_and_stay_bit_identical(tmp_path):
    r0, r1 = _run(tmp_path, "ddp", devices=2, batch_size=4, steps=6)
    (single,) = _run(tmp_path, "single", devices=1, batch_size=8, steps=6)
    assert r0["world_size"] == 2
    # parameters bit-identical on both ranks
    assert torch.equal(r0["params"], r1["params"])
    # every rank took the same number of steps and received the same released scalar
    assert len(r0["steps"]) == len(r1["steps"]) == 6
    assert r0["steps"] == r1["steps"]
    # the same global Poisson sample as one process with the same global batch size and seeds
    assert [s[3] for s in r0["steps"]] == [s[3] for s in single["steps"]]
    # and the same update (up to fp32 rounding of different batch compositions)
    torch.testing.assert_close(r0["params"], single["params"], atol=1e-4, rtol=0)
    assert r0["report"]["sample_rate"] == single["report"]["sample_rate"] == 8 / 64
    assert r0["report"]["steps"] == 6


def test_noise_added_exactly_once_across_ranks(tmp_path):
    sigma, clip, steps = 1.0, 2.0, 120
    r0, r1 = _run(tmp_path, "noisy", devices=2, batch_size=4, steps=steps, noise_multiplier=sigma)
    noise = torch.tensor([s[2] for s in r0["steps"]], dtype=torch.float64)
    assert r0["steps"] == r1["steps"]  # every rank applies the same noisy scalar
    assert torch.equal(r0["params"], r1["params"])
    # the released scalar is (clipped sum + noise) / E[B], the noise has std σC: once, not √2·σC (twice)
    g = torch.tensor([s[0] for s in r0["steps"]], dtype=torch.float64)
    clipped = torch.tensor([s[1] for s in r0["steps"]], dtype=torch.float64)
    torch.testing.assert_close(g * 8.0, clipped + noise)
    std = noise.std().item()
    # 120 draws: the std estimate has ~6.5% relative error; √2 σC would be 41% off
    assert 0.78 * sigma * clip < std < 1.22 * sigma * clip, std


def test_several_directions_on_two_ranks_each_get_their_own_noise_once(tmp_path):
    """num_directions = 3: the three releases of a step travel in one all-reduce; each is its own clipped sum plus
    its own N(0, σ²C²) draw, added once across the ranks, and every rank applies the same three scalars."""
    sigma, clip, steps, q = 1.0, 2.0, 60, 3
    r0, r1 = _run(tmp_path, "noisy", devices=2, batch_size=4, steps=steps, noise_multiplier=sigma, num_directions=q)
    assert r0["directions"] == r1["directions"] and torch.equal(r0["params"], r1["params"])
    releases = torch.tensor(r0["directions"], dtype=torch.float64)  # [steps, q, (ĝ, clipped sum, noise, count)]
    assert releases.shape == (steps, q, 4)
    torch.testing.assert_close(releases[..., 0] * 8.0, releases[..., 1] + releases[..., 2])
    assert (releases[..., 3] == releases[:, :1, 3]).all()  # one batch for all directions of a step
    assert not torch.equal(releases[:, 0, 1], releases[:, 1, 1])  # different directions, different clipped sums
    noise = releases[..., 2]
    assert (noise[:, 0] != noise[:, 1]).all() and (noise[:, 1] != noise[:, 2]).all()
    # 180 draws: the std estimate has ~5.3% relative error; twice-added noise (√2·σC) would be 41% off
    assert 0.8 * sigma * clip < noise.std().item() < 1.2 * sigma * clip


def test_pruned_stagewise_on_two_ranks_matches_one_process(tmp_path):
    """ZOPruning + StagewiseZO (prox) under DDP: one mask on every rank (broadcast from rank 0), coordinates outside
    it untouched, ranks bit-identical, and the same run as one process."""
    r0, r1 = _run(tmp_path, "ddp", devices=2, batch_size=4, steps=6, sparse=True)
    (single,) = _run(tmp_path, "single", devices=1, batch_size=8, steps=6, sparse=True)
    assert torch.equal(r0["params"], r1["params"]) and r0["steps"] == r1["steps"]
    moved = r0["params"] != r0["initial"]
    assert 0 < int(moved.sum()) <= round(0.3 * moved.numel())  # only masked coordinates moved
    assert torch.equal(moved, single["params"] != single["initial"])  # the same mask as one process
    assert [s[3] for s in r0["steps"]] == [s[3] for s in single["steps"]]
    torch.testing.assert_close(r0["params"], single["params"], atol=1e-4, rtol=0)
