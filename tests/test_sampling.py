import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.privacy import EmptyBatch, PoissonBatchSampler, poisson_dataloader


def test_inclusion_rate_is_q_and_independent():
    n, q, steps = 500, 0.04, 400
    sampler = PoissonBatchSampler(n, q, steps, seed=11)
    counts = torch.zeros(n)
    sizes = []
    for idx in sampler:
        counts[idx] += 1
        sizes.append(len(idx))
    rate = counts.sum() / (n * steps)
    # mean inclusion rate: 200k Bernoulli(q) trials, std of the mean ≈ 4.4e-4
    assert abs(rate.item() - q) < 2e-3
    # batch sizes vary like Binomial(n, q): var ≈ n q (1 - q) = 19.2
    var = torch.tensor(sizes, dtype=torch.float64).var().item()
    assert 13 < var < 27, var
    # every example's count looks Binomial(steps, q) (no example favoured): mean 16, var ≈ 15.4
    assert abs(counts.mean().item() - steps * q) < 1.0
    assert 10 < counts.var().item() < 22


def test_neighbours_and_ends_are_included_independently():
    """The sample is drawn as geometric gaps: the first and last example join with probability q, and two
    neighbours together with q² (a gap that could not be 1, or an off-by-one at either end, fails this)."""
    n, q, steps = 40, 0.3, 4000
    sampler = PoissonBatchSampler(n, q, steps, seed=2)
    joined = torch.zeros(steps, n, dtype=torch.bool)
    for t in range(steps):
        joined[t, sampler.global_indices(t)] = True
    rate = joined.double().mean(0)  # per example: std ≈ sqrt(q(1-q)/steps) ≈ 7.2e-3
    assert (rate - q).abs().max() < 0.035 and abs(rate[0] - q) < 0.025 and abs(rate[-1] - q) < 0.025
    both = (joined[:, :-1] & joined[:, 1:]).double().mean()  # 156k pairs, mean q² = 0.09
    assert abs(both.item() - q * q) < 0.006
    apart = (joined[:, :-2] & joined[:, 2:]).double().mean()
    assert abs(apart.item() - q * q) < 0.006


def test_the_sample_does_not_depend_on_how_many_gaps_are_drawn_at_once(monkeypatch):
    from lightning_dp.privacy import sampling

    sampler = PoissonBatchSampler(1000, 0.05, 1, seed=9)
    expected = [sampler.global_indices(t) for t in range(20)]
    monkeypatch.setattr(sampling, "_gap_draws", lambda n, q: 3)  # many rounds per step
    for t in range(20):
        assert torch.equal(sampler.global_indices(t), expected[t])
    assert torch.equal(PoissonBatchSampler(7, 1.0, 1, seed=1).global_indices(0), torch.arange(7))


def test_shards_partition_the_global_sample_and_all_ranks_take_the_same_steps():
    n, q, steps, world = 103, 0.03, 50, 3
    samplers = [PoissonBatchSampler(n, q, steps, seed=5, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [steps] * world == [len(s) for s in samplers]
    empty = 0
    for t in range(steps):
        shards = [per_rank[r][t] for r in range(world)]
        union = sorted(i for s in shards for i in s)
        assert union == samplers[0].global_indices(t).tolist()
        assert len(set(union)) == len(union)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        empty += sum(1 for s in shards if not s)
    assert empty > 0  # with these sizes some shards are empty, and they are still yielded


def test_masks_are_keyed_by_step_so_resume_never_replays():
    s = PoissonBatchSampler(200, 0.05, 10, seed=3, step_source=lambda: 0)
    first = list(s)
    resumed = PoissonBatchSampler(200, 0.05, 10, seed=3, step_source=lambda: 4)
    assert list(resumed)[:6] == first[4:]
    later = PoissonBatchSampler(200, 0.05, 10, seed=3, step_source=lambda: 10)
    assert list(later) != first
    other_seed = PoissonBatchSampler(200, 0.05, 10, seed=4, step_source=lambda: 0)
    assert list(other_seed) != first


def test_own_counter_continues_across_epochs():
    s = PoissonBatchSampler(50, 0.2, 5, seed=1)
    e1, e2 = list(s), list(s)
    assert e1 != e2
    assert e2[0] == s.global_indices(5).tolist()


def test_dataloader_yields_empty_batches():
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    base = DataLoader(ds, batch_size=2, num_workers=0)
    dl = poisson_dataloader(base, PoissonBatchSampler(10, 0.05, 40, seed=0))
    batches = list(dl)
    assert len(batches) == 40
    assert any(isinstance(b, EmptyBatch) for b in batches)
    for b in batches:
        if not isinstance(b, EmptyBatch):
            x, y = b
            assert x.shape == y.shape and x.ndim == 1
