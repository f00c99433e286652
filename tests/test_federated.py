"""Federated DP-LoRA (client-level DP): the mechanism's math, the strategy on one process with 4 virtual clients, and
2 CPU ranks × 2 virtual clients through Lightning's own `ddp` launcher (a script run in a subprocess)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import lightning.pytorch as L
import pytest
import torch
from helpers import linear_data, loader, trainer_kwargs
from torch import nn

from lightning_dp.mechanisms.federated import (
    AdapterVector,
    aggregate_uploads,
    client_noise_std,
    clip_update,
    local_batch,
    lora_product_gap,
    privatize_upload,
    sample_clients,
    split_by_label,
    split_iid,
)
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.privacy.accounting import calibrate_noise_multiplier
from lightning_dp.strategies.base import UnsafeSettingError
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_federated.py")
_spec = importlib.util.spec_from_file_location("ddp_federated", SCRIPT)
ddp_federated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_federated)

PARTITION = [list(range(0, 20)), list(range(20, 40)), list(range(40, 64)), []]  # client 3 holds no data


def lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], **kw)


def fit(strategy, model=None, n=64, batch_size=8, **trainer_overrides):
    model = model or ddp_federated.Net()
    kw = trainer_kwargs(max_steps=-1, max_epochs=None)
    kw.update(trainer_overrides)
    trainer = L.Trainer(strategy=strategy, **kw)
    trainer.fit(model, loader(linear_data(n=n), batch_size))
    return model, trainer


# ---------------------------------------------------------------------------------------------- mechanism
def test_clip_is_joint_over_all_factors():
    a, b = torch.full((30,), 1.0), torch.full((70,), 2.0)  # two "factors" of one update
    delta = torch.cat([a, b])
    clipped, norm = clip_update(delta, 1.5)
    assert norm == pytest.approx(float(delta.norm()))
    assert float(clipped.norm()) == pytest.approx(1.5, rel=1e-5)  # the whole update, not √2·C for two factors
    torch.testing.assert_close(clipped / clipped.norm(), delta / delta.norm())  # direction kept
    small = torch.full((10,), 1e-3)
    assert torch.equal(clip_update(small, 1.5)[0], small)  # below C: unchanged


def test_upload_noise_added_once_with_the_placement_std():
    sigma, clip, k, n = 1.3, 0.7, 4, 200_000
    noise = GaussianNoise(seed=1)
    assert client_noise_std(sigma, clip, k, "local") == pytest.approx(sigma * clip)
    assert client_noise_std(sigma, clip, k, "distributed") == pytest.approx(sigma * clip / 2)
    delta = torch.randn(n)
    for placement in ("local", "distributed"):
        std = client_noise_std(sigma, clip, k, placement)
        up, info = privatize_upload(delta, clip, std, noise, participates=True)
        clipped = clip_update(delta, clip)[0]
        assert info.clipped_norm <= clip * (1 + 1e-6) and info.update_norm > clip
        assert (up - clipped).std().item() == pytest.approx(std, rel=0.02)  # once: not 0, not √2·std
        alone, info = privatize_upload(delta, clip, std, noise, participates=False)
        assert info.clipped_norm == 0.0  # a client that does not take part uploads noise only
        assert alone.std().item() == pytest.approx(std, rel=0.02)
    # the sum over K distributed uploads carries σC, over K local uploads σC√K; the server divides by q·K
    total = sum(privatize_upload(torch.zeros(n), clip, client_noise_std(sigma, clip, k, "distributed"), noise, False)[0]
                for _ in range(k))
    assert total.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert aggregate_uploads(total, k, 0.5).std().item() == pytest.approx(sigma * clip / 2, rel=0.02)


def test_client_sampling_is_poisson_keyed_by_seed_and_round():
    masks = torch.stack([sample_clients(7, r, 50, 0.3) for r in range(400)])
    assert masks.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(masks[5], sample_clients(7, 5, 50, 0.3))  # every party computes the same mask
    assert not torch.equal(masks[5], masks[6]) and not torch.equal(masks[5], sample_clients(8, 5, 50, 0.3))
    sizes = masks.sum(1).float()
    assert sizes.var().item() > 1.0  # not a fixed-size sample
    assert torch.equal(sample_clients(7, 0, 6, 1.0), torch.ones(6, dtype=torch.bool))


def test_local_batches_and_splits():
    b = local_batch(3, client=1, local_step=4, shard_size=10, batch_size=4, poisson=False)
    assert len(b) == 4 and len(set(b.tolist())) == 4 and int(b.max()) < 10
    assert torch.equal(b, local_batch(3, 1, 4, 10, 4, False))
    sizes = [len(local_batch(3, 0, s, 40, 8, True)) for s in range(300)]
    assert sum(sizes) / 300 == pytest.approx(8, rel=0.1) and len(set(sizes)) > 3  # Poisson with q = 8/40
    assert len(local_batch(3, 0, 0, 0, 8, True)) == 0
    parts = split_iid(103, 4, seed=1)
    assert sorted(sum(parts, [])) == list(range(103)) and {len(p) for p in parts} <= {25, 26}
    labels = [i % 3 for i in range(300)]
    skewed = split_by_label(labels, 4, alpha=0.1, seed=0)
    assert sorted(sum(skewed, [])) == list(range(300))
    share = max(max(sum(labels[i] == c for i in p) for c in range(3)) / max(1, len(p)) for p in skewed)
    assert share > 0.8  # some client is dominated by one label


def test_product_trap_factors_vs_b_only():
    torch.manual_seed(0)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    da = [0.1 * torch.randn(3, 6) for _ in range(2)]
    db = [0.1 * torch.randn(5, 3) for _ in range(2)]
    gap = lora_product_gap(da, db, a, b)
    cross = torch.stack([y @ x for x, y in zip(da, db)]).mean(0) - torch.stack(db).mean(0) @ torch.stack(da).mean(0)
    torch.testing.assert_close(gap, cross)  # FedAvg of factors misses exactly the cross term ...
    assert gap.norm() > 1e-3
    zero = [torch.zeros_like(a)] * 2  # ... which vanishes when A is frozen (b_only)
    assert lora_product_gap(zero, db, a, b).abs().max().item() < 1e-6


def test_adapter_vector_round_trip():
    p1, p2 = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(4))
    vec = AdapterVector([("a.lora_A.default.weight", p1), ("a.lora_B.default.weight", p2)])
    flat = vec.read()
    assert flat.numel() == 10 == vec.numel
    vec.write_(flat * 2)
    torch.testing.assert_close(vec.read(), flat * 2)


# ---------------------------------------------------------------------------------------------- strategy, 1 process
def test_base_bit_identical_only_adapters_travel_and_updates_clipped():
    torch.manual_seed(0)
    model = ddp_federated.Net()
    base = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    clip = 0.01
    strategy = DPLoRAFederatedStrategy(noise_multiplier=0.3, clip=clip, rounds=3, local_steps=2, clients=4,
                                       partition=PARTITION, lora=lora(), sampling_seed=5, accountant="rdp")
    fit(strategy, model)
    assert all(torch.equal(p, before) for p, before in base.values())  # frozen base untouched (same objects)
    assert strategy.adapters.names and all("lora_" in n for n in strategy.adapters.names)
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert strategy.adapters.numel == lora_numel
    comm = strategy.privacy_report()["communication"]
    assert comm["upload_bytes_per_client"] == 4 * lora_numel
    assert comm["full_model_bytes_per_client"] == 4 * sum(b.numel() for _, b in base.values())
    assert comm["allreduce_bytes_total"] == 3 * 4 * lora_numel  # one adapter-sized buffer per round
    uploads = [u for e in strategy._round_log for u in e["uploads"]]
    assert len(uploads) == 3 * 4
    trained = [u for u in uploads if u.shard_size > 0]
    assert all(u.clipped_norm <= clip * (1 + 1e-5) for u in uploads)
    assert all(u.update_norm > clip for u in trained)  # the bound was active, so the check above can fail
    empty = [u for u in uploads if u.client == 3]
    assert all(u.update_norm == 0 and u.noise_std == pytest.approx(0.3 * clip) for u in empty)
    # steps of the empty client ran no forward: 3 rounds × 3 clients with data × 2 local steps
    assert model.calls == 3 * 3 * 2


@pytest.mark.parametrize("placement, fraction", [("local", 1.0), ("distributed", 0.5)])
def test_noise_std_of_the_global_update(placement, fraction):
    """lr = 0: every update is 0, so the change of the global adapters is the aggregated noise alone: std
    σC·√K/(qK) (local) or σC/(qK) (distributed). Twice the noise or none at all would fail."""
    sigma, clip, k, rounds = 1.0, 0.5, 4, 3
    strategy = DPLoRAFederatedStrategy(noise_multiplier=sigma, clip=clip, rounds=rounds, local_steps=1, clients=k,
                                       client_fraction=fraction, noise_placement=placement, lora=lora(),
                                       sampling_seed=2, accountant="rdp")
    rec = ddp_federated.RoundRecorder()
    fit(strategy, ddp_federated.Net(lr=0.0, hidden=128), callbacks=[rec])
    steps = torch.diff(torch.stack(rec.globals), dim=0)
    assert steps.shape[0] == rounds
    expected = sigma * clip * (math.sqrt(k) if placement == "local" else 1.0) / (fraction * k)
    assert steps.std().item() == pytest.approx(expected, rel=0.08)


def test_epsilon_from_the_accountant_and_calibration(tmp_path):
    from opacus.accountants import RDPAccountant

    from lightning_dp.callbacks.budget import PrivacyBudget

    q, rounds = 0.5, 4
    strategy = DPLoRAFederatedStrategy(eps=3.0, clip=0.1, rounds=rounds, clients=4, client_fraction=q,
                                       lora=lora(), sampling_seed=1, accountant="rdp")
    fit(strategy, callbacks=[PrivacyBudget(report_path=str(tmp_path / "report.json"))])
    report = strategy.privacy_report()
    assert json.load(open(tmp_path / "report.json"))["epsilon"] == pytest.approx(report["epsilon"])
    assert report["privacy_unit"] == "client" and report["rounds"] == rounds
    assert report["delta"] == 1e-5
    sigma = calibrate_noise_multiplier(3.0, 1e-5, q, rounds, "rdp")
    assert report["noise_multiplier"] == pytest.approx(sigma)
    acc = RDPAccountant()
    acc.history = [(sigma, q, rounds)]
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert 2.8 < report["epsilon"] <= 3.0 + 1e-2
    # the guarantee against the server: sensitivity 2C, no amplification, worst case of a client in every round
    local = RDPAccountant()
    local.history = [(sigma / 2, 1.0, rounds)]
    assert report["local_epsilon"] == pytest.approx(local.get_epsilon(1e-5))
    # non-private run: no noise, ε infinite, said so
    strategy = DPLoRAFederatedStrategy(noise_multiplier=0.0, clip=1e6, rounds=1, clients=2, lora=lora())
    fit(strategy)
    assert math.isinf(strategy.privacy_report()["epsilon"])


def test_example_level_dpsgd_inside_clients():
    """Example-level DP-SGD inside each client: with a tiny example clip every gradient is noise of std
    σ_ex·C_ex/(q_k·N_k), so one SGD step moves a client by lr times that; ε_ex is Opacus's for its steps."""
    from opacus.accountants import RDPAccountant

    sigma_ex, clip_ex, lr, k, n, bs = 2.0, 1e-7, 1.0, 2, 64, 8
    strategy = DPLoRAFederatedStrategy(noise_multiplier=0.0, clip=1e6, rounds=2, local_steps=1, clients=k,
                                       example_noise_multiplier=sigma_ex, example_clip=clip_ex, lora=lora(),
                                       sampling_seed=4, accountant="rdp")
    rec = ddp_federated.RoundRecorder()
    fit(strategy, ddp_federated.Net(lr=lr, hidden=128), n=n, batch_size=bs, callbacks=[rec])
    steps = torch.diff(torch.stack(rec.globals), dim=0)
    shard = n // k
    per_client = lr * sigma_ex * clip_ex / ((bs / shard) * shard)
    assert steps.std().item() == pytest.approx(per_client * math.sqrt(k) / k, rel=0.08)
    report = strategy.privacy_report()["example_level"]
    acc = RDPAccountant()
    acc.history = [(sigma_ex, bs / shard, 2)]
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(report["delta"]))
    assert report["delta"] == pytest.approx(1 / n**1.1)


def test_b_only_freezes_a_and_trains_b():
    torch.manual_seed(0)
    model = ddp_federated.Net()
    strategy = DPLoRAFederatedStrategy(noise_multiplier=0.0, clip=1e6, rounds=2, clients=2, aggregation="b_only",
                                       lora=lora(), sampling_seed=3)
    rec = ddp_federated.RoundRecorder()
    fit(strategy, model, callbacks=[rec])
    assert strategy.adapters.names and all("lora_B" in n for n in strategy.adapters.names)  # A never travels
    assert not torch.equal(rec.globals[0], rec.globals[-1])
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert a and not any(p.requires_grad for p in a)


def test_module_holding_a_peft_model():
    """A LightningModule that already holds a ``PeftModel`` (no ``lora=``): its adapters are federated as they are."""
    from peft import get_peft_model

    class PeftNet(ddp_federated.Net):
        def __init__(self):
            super().__init__()
            mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
            self.net = get_peft_model(mlp, _mlp_lora())
            del self.fc1, self.fc2

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")

    torch.manual_seed(0)
    model = PeftNet()
    base = [(p, p.detach().clone()) for n, p in model.named_parameters() if "lora_" not in n]
    strategy = DPLoRAFederatedStrategy(noise_multiplier=0.0, clip=1e6, rounds=2, clients=2, sampling_seed=1)
    rec = ddp_federated.RoundRecorder()
    fit(strategy, model, callbacks=[rec])
    assert strategy.adapters.names and all("lora_" in n for n in strategy.adapters.names)
    assert all(torch.equal(p, before) for p, before in base)
    assert not torch.equal(rec.globals[0], rec.globals[-1])


def _mlp_lora():
    from peft import LoraConfig

    return LoraConfig(r=2, target_modules=["0", "2"])


def test_refused_settings():
    with pytest.raises(UnsafeSettingError, match="no LoRA adapter"):
        fit(DPLoRAFederatedStrategy(noise_multiplier=1.0, rounds=1, clients=2))
    with pytest.raises(UnsafeSettingError, match="limit_train_batches"):
        fit(DPLoRAFederatedStrategy(noise_multiplier=1.0, rounds=1, clients=2, lora=lora()), limit_train_batches=2)
    with pytest.raises(UnsafeSettingError, match="planned number of rounds"):
        fit(DPLoRAFederatedStrategy(eps=3.0, clients=2, lora=lora()))
    strategy = DPLoRAFederatedStrategy(noise_multiplier=1.0, rounds=1, clients=2, lora=lora())
    model, trainer = fit(strategy)
    with pytest.raises(UnsafeSettingError, match="trains once"):
        trainer.fit(model, loader(linear_data(n=64), 8))
    with pytest.raises(ValueError, match="client_fraction"):
        DPLoRAFederatedStrategy(eps=3.0, client_fraction=0.0)


# ---------------------------------------------------------------------------------------------- 2 ranks × 2 clients
CONFIGS = [
    {"lr": 0.05, "sigma": 0.0, "clip": 0.01, "rounds": 3, "partition": PARTITION, "placement": "local"},
    {"lr": 0.0, "sigma": 1.0, "clip": 0.5, "rounds": 3, "partition": None, "placement": "local", "hidden": 128},
    {"lr": 0.0, "sigma": 1.0, "clip": 0.5, "rounds": 3, "partition": None, "placement": "distributed", "hidden": 128},
]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("federated")
    out = str(tmp / "fed")
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--devices", "2", "--configs", json.dumps(CONFIGS), "--out", out],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]


def test_ddp_base_identical_only_lora_all_reduced_and_matches_one_process(ddp_results):
    r0, r1 = (res[0] for res in ddp_results)
    assert r0["world_size"] == 2
    assert r0["base_unchanged"] and r1["base_unchanged"]
    assert torch.equal(r0["globals"], r1["globals"])  # global adapters bit-identical on both ranks
    assert all("lora_" in n for n in r0["adapter_names"]) and r0["adapter_numel"] == r0["lora_numel"]
    # every all-reduce: a 1-element fingerprint mismatch flag, the initial adapters from rank 0, the K shard sizes,
    # then one adapter-sized buffer per round; nothing base-sized ever
    numel = r0["adapter_numel"]
    assert r0["collective_sizes"] == [[1, 4], [numel, 4], [4, 8]] + [[numel, 4]] * 3
    assert r0["report"]["communication"]["allreduce_bytes_total"] == 3 * 4 * numel
    # each client's update clipped before noise, the empty client (3, on rank 1) handled
    uploads = r0["uploads"] + r1["uploads"]
    assert len(uploads) == 3 * 4
    assert all(u[4] <= 0.01 * (1 + 1e-5) for u in uploads)
    assert all(u[3] > 0.01 for u in uploads if u[2] > 0)
    assert all(u[3] == 0 for u in uploads if u[0] == 3)
    assert "shard_sizes" not in r0["report"]  # per-client sizes are private
    assert r1["calls"] == 3 * 2  # rank 1: client 2 trains, client 3 (no data) runs no forward
    # the same federation on one process with 4 virtual clients gives the same global adapters
    single = ddp_federated.run(CONFIGS[0], devices=1)
    torch.testing.assert_close(single["globals"], r0["globals"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which, factor", [(1, 2.0), (2, 1.0)])
def test_ddp_noise_once_across_ranks(ddp_results, which, factor):
    """lr = 0: the global change is the noise alone; σC·√K/K (local) or σC/K (distributed), not √2 times that."""
    r0, r1 = (res[which] for res in ddp_results)
    assert torch.equal(r0["globals"], r1["globals"])
    steps = torch.diff(r0["globals"], dim=0)
    assert steps.std().item() == pytest.approx(1.0 * 0.5 * factor / 4, rel=0.08)
    assert r0["report"]["noise_placement"] == CONFIGS[which]["placement"]
