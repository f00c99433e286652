"""Data-free pruning (ZOPruning) and sparse ZO: the mask never reads training data, coordinates outside it never
move, the sparse kernels equal the dense update restricted to the mask (both paths), and the mask is compact and
survives checkpoints."""

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, clipped_difference_mean, flat_params, linear_data, loader, trainer_kwargs
from torch.utils.data import DataLoader, Dataset

from custom_kernels import normal_stream, offsets_for, perturb_
from lightning_dp.callbacks.pruning import ZOPruning
from lightning_dp.callbacks.stagewise import StagewiseZO
from lightning_dp.mechanisms.zo import SeededDirections, data_free_mask
from lightning_dp.strategies.dpzero import DPZeroStrategy


class Pruned(TinyClassifier):
    """TinyClassifier with a constant-input example (what the default data-free objective feeds it)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.example_input_array = torch.zeros(1, 8)


def _model(**kw):
    torch.manual_seed(0)
    return Pruned(**kw)


def _strategy(**kw):
    kw = {"noise_multiplier": 0.0, "clip": 2.0, "seed": 17, "sampling_seed": 4, "accountant": "rdp", **kw}
    return DPZeroStrategy(**kw)


def _fit(model, strategy, callbacks, steps=5, data=None, ckpt=None, batch_size=8):
    trainer = L.Trainer(strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(max_steps=steps))
    trainer.fit(model, loader(data if data is not None else linear_data(), batch_size), ckpt_path=ckpt)
    return trainer


def _outside(model, strategy):
    """Boolean [numel] of the coordinates outside the mask, in flat_params order."""
    keep = []
    for p, idx in zip(model.parameters(), strategy.directions.indices):
        m = torch.ones(p.numel(), dtype=torch.bool)
        m[idx.long().cpu()] = False
        keep.append(m)
    return torch.cat(keep)


# ---------------------------------------------------------------------------------------------- data-free
class Untouchable(Dataset):
    """A training set that raises the moment any example is read."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        raise RuntimeError("training data was read")


@pytest.mark.parametrize("score", ["zo_hessian", "magnitude"])
def test_mask_is_computed_without_reading_training_data(score):
    model = _model()
    reference = _model()
    strategy = _strategy()
    pruning = ZOPruning(trainable_fraction=0.1, score=score, num_queries=2)
    trainer = L.Trainer(strategy=strategy, callbacks=[pruning], **trainer_kwargs(max_steps=3))
    with pytest.raises(RuntimeError, match="training data was read"):
        trainer.fit(model, DataLoader(Untouchable(), batch_size=8))
    assert pruning.computed_at == [0]  # the mask exists before the first example is read
    # and it is the mask of the standalone function, which is given no data at all
    from custom_kernels.zo_perturb import mix_seed
    from lightning_dp.callbacks.pruning import _SEED_DOMAIN

    expected = data_free_mask(reference, list(reference.parameters()), 0.1, score, seed=mix_seed(_SEED_DOMAIN, 17, 0),
                              num_queries=2)
    for got, want in zip(strategy.directions.indices, expected):
        assert torch.equal(got, want)


def test_scoring_leaves_the_model_bit_identical_and_is_deterministic():
    model = _model(dropout=0.3)
    before = flat_params(model)
    model.train()
    a = data_free_mask(model, list(model.parameters()), 0.2, "zo_hessian", seed=3, num_queries=3)
    b = data_free_mask(model, list(model.parameters()), 0.2, "zo_hessian", seed=3, num_queries=3)
    c = data_free_mask(model, list(model.parameters()), 0.2, "zo_hessian", seed=4, num_queries=3)
    assert torch.equal(flat_params(model), before) and model.training
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # the directions matter (a seeded estimate)
    assert sum(i.numel() for i in a) == round(0.2 * before.numel())


@pytest.mark.parametrize("keep", ["smallest", "largest"])
def test_magnitude_score_selects_by_absolute_value(keep):
    model = _model()
    params = list(model.parameters())
    mask = data_free_mask(model, params, 0.25, "magnitude", keep=keep)
    flat = torch.cat([p.detach().reshape(-1).abs() for p in params])
    chosen = torch.cat([idx.long() + sum(q.numel() for q in params[:k]) for k, idx in enumerate(mask)])
    k = round(0.25 * flat.numel())
    assert chosen.numel() == k
    expected = torch.topk(flat, k, largest=keep == "largest").indices
    assert set(chosen.tolist()) == set(expected.tolist())


def test_hugging_face_model_gets_a_constant_token():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=8, type_vocab_size=1, num_labels=2)
    hf = RobertaForSequenceClassification(config)
    params = [p for n, p in hf.named_parameters() if "encoder" in n]
    before = [p.detach().clone() for p in hf.parameters()]
    mask = data_free_mask(hf, params, 0.05, "zo_hessian", seed=1)
    assert sum(i.numel() for i in mask) == round(0.05 * sum(p.numel() for p in params))
    assert all(torch.equal(a, b) for a, b in zip(before, hf.parameters()))


def test_unknown_constant_input_is_a_clear_error():
    model = TinyClassifier()
    with pytest.raises(ValueError, match="objective"):
        data_free_mask(model, list(model.parameters()), 0.1, "zo_hessian")
    with pytest.raises(ValueError, match="parameters of the module"):
        data_free_mask(model, list(TinyClassifier().parameters()), 0.1, "zo_hessian",
                       objective=lambda m: m.net[0].weight.sum())


# ---------------------------------------------------------------------------------------------- sparse kernels
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, index_dtype", [(torch.float32, torch.int32), (torch.bfloat16, torch.int64)])
def test_sparse_update_equals_dense_update_restricted_to_the_mask(backend, dtype, index_dtype):
    """Gather the masked coordinates into a dense vector, apply the dense kernel to it, scatter back: the sparse
    kernel gives the same bits, and leaves every other element untouched. More than one 64K block per tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 300, generator=g).to(dtype)  # 120k elements
    b = torch.randn(50, generator=g).to(dtype)
    iw = torch.randperm(w.numel(), generator=g)[:70_000].sort().values.to(index_dtype)
    ib = torch.tensor([0, 7, 49], dtype=index_dtype)
    offsets = offsets_for([w, b], [iw, ib])
    dense = [w.view(-1)[iw.long()].clone(), b[ib.long()].clone()]
    w0, b0 = w.clone(), b.clone()
    kwargs = dict(seed2=11, scale2=[0.3, -0.2], decay=[0.99, 0.9], backend=backend)
    perturb_([w, b], offsets, 5, [0.5, 2.0], indices=[iw, ib], **kwargs)
    perturb_(dense, offsets, 5, [0.5, 2.0], **kwargs)
    for t, t0, idx, d in ((w, w0, iw, dense[0]), (b, b0, ib, dense[1])):
        assert torch.equal(t.view(-1)[idx.long()], d)
        outside = torch.ones(t.numel(), dtype=torch.bool)
        outside[idx.long()] = False
        assert torch.equal(t.view(-1)[outside], t0.view(-1)[outside])
    # and z is drawn for the masked coordinates only: position j of the list gets z(seed, offset + j)
    z = normal_stream(5, offsets[0], iw.numel(), backend=backend)
    z2 = normal_stream(11, offsets[0], iw.numel(), backend=backend)
    expected = 0.99 * w0.view(-1)[iw.long()].float() + 0.5 * z + 0.3 * z2
    torch.testing.assert_close(w.view(-1)[iw.long()].float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_invalid_masks_are_refused():
    p = torch.zeros(10)
    d = SeededDirections([p], 0)
    with pytest.raises(ValueError, match="distinct"):
        d.set_mask([torch.tensor([1, 1])])
    with pytest.raises(ValueError, match="lie in"):
        d.set_mask([torch.tensor([10])])
    with pytest.raises(ValueError, match="no coordinate"):
        d.set_mask([torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="integers"):
        d.set_mask([torch.tensor([0.5])])


# ---------------------------------------------------------------------------------------------- in training
def test_coordinates_outside_the_mask_stay_bit_identical_through_training():
    model = _model(weight_decay=0.1)
    before = flat_params(model)
    strategy = _strategy(noise_multiplier=1.0, zo_eps=1e-2)
    callbacks = [ZOPruning(trainable_fraction=0.1), StagewiseZO(stages=2, first_stage_steps=4, prox=0.5)]
    _fit(model, strategy, callbacks, steps=20)
    assert strategy.schedule == "two_pass"
    outside = _outside(model, strategy)
    after = flat_params(model)
    assert torch.equal(after[outside], before[outside])
    assert (after[~outside] != before[~outside]).float().mean() > 0.9  # the masked coordinates did train
    assert strategy.privacy_report()["trainable_coordinates"] == (~outside).sum().item() == round(0.1 * before.numel())


def test_one_masked_step_is_the_dpzero_formula_with_a_masked_direction():
    """θ_1 = θ_0 − η·ĝ·(m ⊙ z), ĝ from probes at θ_0 ± λ(m ⊙ z): the dense DPZero step restricted to the mask."""
    torch.manual_seed(0)
    lr, lam, clip = 0.1, 1e-2, 0.5
    model = _model(lr=lr)
    reference = _model(lr=lr)
    data = linear_data(n=16)
    strategy = _strategy(clip=clip, zo_eps=lam, poisson_sampling=False)
    _fit(model, strategy, [ZOPruning(trainable_fraction=0.2)], steps=1, data=data, batch_size=16)
    x, y = data.tensors
    params = list(reference.parameters())
    seed = strategy.directions.seed_for(0)
    zs = []
    for p, idx, o in zip(params, strategy.directions.indices, strategy.directions.offsets):
        z = torch.zeros(p.numel())
        z[idx.long()] = normal_stream(seed, o, idx.numel())
        zs.append(z.view_as(p))
    g = clipped_difference_mean(reference, zs, x, y, lam, clip, 16)
    with torch.no_grad():
        for p, z in zip(params, zs):
            p.sub_(lr * g * z)
    assert strategy.last_step.projected_grad == pytest.approx(g, rel=1e-4, abs=1e-7)
    torch.testing.assert_close(flat_params(model), flat_params(reference), atol=1e-6, rtol=0)


def test_mask_is_compact_and_checkpointed(tmp_path):
    """int32 indices (4 bytes per trained coordinate), no float copy of the model; the anchor only covers the mask;
    a resumed run (mask and stage recomputation included) ends where the uninterrupted one ends."""

    def run(steps, ckpt=None):
        model = _model()
        strategy = _strategy(seed=None if ckpt else 17, sampling_seed=None if ckpt else 4)
        callbacks = [ZOPruning(trainable_fraction=0.1, recompute="stage"),
                     StagewiseZO(stages=3, first_stage_steps=2, zo_eps_end=1e-4, prox=0.2)]
        trainer = _fit(model, strategy, callbacks, steps=steps, ckpt=ckpt)
        return model, strategy, trainer, callbacks[0]

    full_model, full, _, full_pruning = run(10)
    assert full_pruning.computed_at == [0, 2, 6]  # static at setup, then at each stage start
    n = sum(p.numel() for p in full_model.parameters())
    assert all(i.dtype == torch.int32 for i in full.directions.indices)
    assert sum(i.numel() for i in full.directions.indices) == round(0.1 * n)
    assert sum(a.numel() for a in full.directions.anchor) == round(0.1 * n)

    _, _, trainer, _ = run(4)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    zo = torch.load(tmp_path / "c.ckpt", weights_only=True)["lightning_dp"]["zo"]
    assert [i.dtype for i in zo["indices"]] == [torch.int32] * 4
    assert sum(i.numel() for i in zo["indices"]) == sum(a.numel() for a in zo["anchor"]) == round(0.1 * n)
    resumed_model, resumed, _, resumed_pruning = run(10, ckpt=tmp_path / "c.ckpt")
    assert resumed_pruning.computed_at == [6]  # the mask of stage 1 came from the checkpoint
    for a, b in zip(resumed.directions.indices, full.directions.indices):
        assert torch.equal(a, b)
    assert torch.equal(flat_params(resumed_model), flat_params(full_model))


def test_stage_recompute_needs_a_stagewise_schedule():
    with pytest.raises(ValueError, match="StagewiseZO"):
        _fit(_model(), _strategy(), [ZOPruning(recompute="stage")], steps=1)


def test_resume_without_a_mask_is_refused(tmp_path):
    trainer = _fit(_model(), _strategy(), [], steps=2)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    with pytest.raises(ValueError, match="no mask"):
        _fit(_model(), _strategy(), [ZOPruning()], steps=4, ckpt=tmp_path / "dense.ckpt")


@pytest.mark.parametrize("kw", [dict(trainable_fraction=0.0), dict(trainable_fraction=1.5), dict(score="snip"),
                                dict(recompute="epoch"), dict(keep="middle"), dict(num_queries=0)])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        ZOPruning(**kw)
