"""Resuming a DPLoRAFederatedStrategy run from a checkpoint: the round index, the global adapters, the clients'
states and the accountant continue, the secret sampling seed is redrawn and never saved, a checkpoint written
mid-round resumes at the start of that round, and a run with other settings is refused. Small models, one process."""

import importlib.util
import os

import lightning.pytorch as L
import pytest
import torch
from helpers import linear_data, loader, trainer_kwargs
from opacus.accountants import RDPAccountant

from lightning_dp.strategies.base import UnsafeSettingError
from lightning_dp.strategies.federated import DPLoRAFederatedStrategy

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_federated.py")
_spec = importlib.util.spec_from_file_location("ddp_federated_resume", SCRIPT)
ddp_federated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_federated)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"])


class MomentumNet(ddp_federated.Net):
    """Each client keeps a momentum between rounds (what a resumed run must give back to it)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def strategy(**kw):
    args = {"noise_multiplier": 0.5, "clip": 0.1, "rounds": 2, "local_steps": 2, "clients": 2, "lora": lora(),
            "accountant": "rdp"}
    args.update(kw)
    return DPLoRAFederatedStrategy(**args)


def fit(s, model=None, ckpt_path=None, callbacks=(), **trainer_overrides):
    torch.manual_seed(0)  # the same initial weights in every run (the base model is shared by all clients)
    model = model or MomentumNet()
    kw = trainer_kwargs(max_steps=-1, max_epochs=None)
    kw.update(trainer_overrides)
    trainer = L.Trainer(strategy=s, callbacks=list(callbacks), **kw)
    trainer.fit(model, loader(linear_data(n=64), 8), ckpt_path=ckpt_path)
    return model, trainer


class AtStart(L.Callback):
    """What the strategy holds when training starts (after the checkpoint is restored)."""

    def on_train_start(self, trainer, pl_module):
        s = trainer.strategy
        self.global_adapters = s._global.clone()
        self.rounds_completed = s.rounds_completed
        self.client_states = [s._fedavg.client_states.get(slot) for slot in range(s.schedule.clients_per_rank)]


def _contains(obj, seed):
    """``seed`` as an int, float, string or 1-element tensor anywhere in nested containers."""
    if isinstance(obj, bool):
        return False
    if isinstance(obj, (int, float)):
        return obj == seed
    if isinstance(obj, str):
        return str(seed) in obj
    if isinstance(obj, torch.Tensor):
        return obj.numel() == 1 and int(obj.item()) == seed
    if isinstance(obj, dict):
        return any(_contains(k, seed) or _contains(v, seed) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains(v, seed) for v in obj)
    return False


def _saved_adapters(path, names):
    state = torch.load(path, weights_only=False)["state_dict"]
    return torch.cat([state[n].reshape(-1).float() for n in names])


def _assert_same_states(a, b):
    assert len(a) == len(b)
    for client_a, client_b in zip(a, b):
        for opt_a, opt_b in zip(client_a, client_b):
            assert opt_a.keys() == opt_b.keys()
            for key in opt_a:
                assert opt_a[key].keys() == opt_b[key].keys()
                for name in opt_a[key]:
                    torch.testing.assert_close(opt_a[key][name], opt_b[key][name], rtol=0, atol=0)


def test_resume_continues_rounds_adapters_client_states_and_epsilon(tmp_path):
    path = str(tmp_path / "two.ckpt")
    first = strategy(rounds=2)
    _, trainer = fit(first)
    trainer.save_checkpoint(path)
    secret = first.sampling_seed
    saved_states = [first._fedavg.client_states.get(slot) for slot in range(2)]
    assert any(opt["state"] if "state" in opt else opt for client in saved_states for opt in client)
    # neither the checkpoint nor the client-state file holds the drawn secret seed (as an object or as bytes)
    pickled = secret.to_bytes((secret.bit_length() + 8) // 8, "little", signed=True)
    for file in (path, first._clients_path(path)):
        assert not _contains(torch.load(file, weights_only=False), secret), file
        raw = open(file, "rb").read()
        assert pickled not in raw and str(secret).encode() not in raw

    resumed, start = strategy(rounds=4), AtStart()
    fit(resumed, ckpt_path=path, callbacks=[start])
    assert start.rounds_completed == 2 and resumed.rounds_completed == 4
    assert torch.equal(start.global_adapters, _saved_adapters(path, resumed.adapters.names))
    _assert_same_states(start.client_states, saved_states)  # every client got its momentum back
    assert resumed.sampling_seed != secret  # a fresh secret: the new rounds' sampling is independent of the old
    # ε continues: the accounting of an uninterrupted 4-round run at the same σ, q
    uninterrupted = RDPAccountant()
    uninterrupted.history = [(0.5, 1.0, 4)]
    assert resumed.accountant.steps == 4 and resumed.steps_taken == 4
    assert resumed.epsilon == pytest.approx(uninterrupted.get_epsilon(resumed.delta))
    assert resumed.privacy_report()["rounds"] == 4 and resumed.local_epsilon() > first.local_epsilon()


def test_resumed_run_follows_the_uninterrupted_one(tmp_path):
    """Without noise and with seeds you pass, a run resumed after round 2 ends where an uninterrupted run ends:
    the same round index, client sampling, client momenta and global adapters were restored."""
    seeds = {"noise_multiplier": 0.0, "clip": 1e6, "client_fraction": 0.5, "clients": 4, "seed": 3,
             "sampling_seed": 5}
    whole = strategy(rounds=4, **seeds)
    fit(whole)
    path = str(tmp_path / "two.ckpt")
    _, trainer = fit(strategy(rounds=2, **seeds))
    trainer.save_checkpoint(path)
    resumed = strategy(rounds=4, **seeds)
    fit(resumed, ckpt_path=path)
    assert resumed.rounds_completed == 4
    assert not torch.equal(whole._global, _saved_adapters(path, whole.adapters.names))  # rounds 3-4 moved it
    torch.testing.assert_close(resumed._global, whole._global, rtol=0, atol=1e-6)


class SaveAt(L.Callback):
    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_mid_round_checkpoint_resumes_at_the_start_of_that_round(tmp_path):
    """Saved after step 6, inside round 1 (4 steps per round: 2 clients × 2 local steps). The resumed run discards
    the partial round (nothing of it was released) and ends where the uninterrupted run ends; the spend is that of
    the rounds released."""
    seeds = {"noise_multiplier": 0.0, "clip": 1e6, "seed": 3, "sampling_seed": 5}
    whole = strategy(rounds=3, **seeds)
    fit(whole)
    path = str(tmp_path / "mid.ckpt")
    first = strategy(rounds=3, **seeds)
    fit(first, callbacks=[SaveAt(path, 6)])
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 6 and saved["lightning_dp"]["federated"]["rounds_completed"] == 1
    resumed, start = strategy(rounds=3, **seeds), AtStart()
    fit(resumed, ckpt_path=path, callbacks=[start])
    assert start.rounds_completed == 1 and resumed.rounds_completed == 3 and resumed.accountant.steps == 3
    torch.testing.assert_close(resumed._global, whole._global, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"clients": 4}, "clients=2"),
    ({"client_fraction": 0.5}, "client_fraction=1.0"),
    ({"clip": 0.2}, "clip"),
    ({"local_steps": 1}, "local_steps=2"),
    ({"noise_placement": "distributed"}, "noise_placement='local'"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, message):
    path = str(tmp_path / "run.ckpt")
    _, trainer = fit(strategy())
    trainer.save_checkpoint(path)
    resumed = strategy(rounds=4, **change)
    with pytest.raises(UnsafeSettingError, match=message):
        fit(resumed, ckpt_path=path)
    assert resumed.rounds_completed == 0


def test_resume_without_the_client_states_is_refused(tmp_path):
    path = str(tmp_path / "run.ckpt")
    first = strategy()
    _, trainer = fit(first)
    trainer.save_checkpoint(path)
    os.remove(first._clients_path(path))
    with pytest.raises(UnsafeSettingError, match="clients' states"):
        fit(strategy(rounds=4), ckpt_path=path)


def test_model_checkpoint_files_resume_and_are_removed_together(tmp_path):
    """ModelCheckpoint (one per round, the last kept) writes each rank's client states beside each checkpoint and
    removes them with it; its last checkpoint resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=1, monitor="step", mode="max")
    first = strategy(rounds=3)
    fit(first, callbacks=[ckpt], enable_checkpointing=True)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[1] == os.path.basename(first._clients_path(files[0]))
    resumed = strategy(rounds=4)
    fit(resumed, ckpt_path=ckpt.best_model_path)
    assert resumed.rounds_completed == 4 and resumed.accountant.steps == 4
