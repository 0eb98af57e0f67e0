"""GradualPrune: the plan's sparsities reached along a cubic schedule while training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from tightfit import MinMetric, compress
from tightfit.errors import ConfigError
from tightfit.export.artifact import load_model, to_bytes
from tightfit.operators import Compose, Plan, Prune, Quantize, apply
from tightfit.recovery import FineTune, GradualPrune
from tightfit.recovery.gradual import cubic_sparsity


def _data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _trained():
    loader = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    FineTune(loader, epochs=15, lr=1e-2)(model)
    return model.eval(), loader


def _plan(sparsity, quantize=False):
    ops = [Prune(), Quantize(bits=(4,))] if quantize else [Prune()]
    layer = {"prune": {"sparsity": sparsity}, **({"quantize": {"bits": 4}} if quantize else {})}
    return Plan.from_strategy(Compose(ops), {"0": dict(layer), "2": dict(layer)})


def test_cubic_schedule_known_values():
    assert cubic_sparsity(0.9, 0.0) == 0.0
    assert cubic_sparsity(0.9, 0.5) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(0.9, 1.0) == pytest.approx(0.9)
    assert cubic_sparsity(0.9, 3.0) == pytest.approx(0.9)  # holds after the ramp
    assert cubic_sparsity(0.9, 0.0, start=0.5) == pytest.approx(0.5)  # a model pruned before keeps its zeros
    assert cubic_sparsity(0.9, 0.5, start=0.5) == pytest.approx(0.9 - 0.4 * 0.125)


def test_sparsity_grows_along_the_schedule_and_ends_at_the_plan():
    model, loader = _trained()
    candidate = apply(_plan(0.8), model)
    mask = candidate[0].parametrizations.weight[0].mask
    seen = []

    def loss(m, batch):  # records the first layer's sparsity the forward pass trains with
        seen.append(float((mask == 0).float().mean()))
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    rec = GradualPrune(loader, epochs=4, lr=1e-2, ramp=0.5, update_every=1, loss=loss)
    rec(candidate)
    steps = 4 * len(loader)
    assert rec.steps_taken == steps and len(seen) == steps
    assert seen[0] == 0.0  # dense at the start
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))  # never re-grows
    assert seen[steps // 4] < 0.8 - 0.05  # still ramping halfway through the ramp
    assert seen[-1] == pytest.approx(0.8, abs=0.01)  # held after the ramp
    for name in ("0", "2"):
        chain = candidate.get_submodule(name).parametrizations.weight
        assert chain[0].sparsity == pytest.approx(0.8, abs=0.01)
        assert (chain.original[chain[0].mask == 0] == 0).all()  # pruned weights are zero, not just hidden


def test_masks_are_chosen_on_the_trained_weights_not_the_plan():
    model, loader = _trained()
    candidate = apply(_plan(0.7), model)
    one_shot = candidate[0].parametrizations.weight[0].mask.clone()
    GradualPrune(loader, epochs=3, lr=1e-2)(candidate)
    assert not torch.equal(candidate[0].parametrizations.weight[0].mask, one_shot)


def test_beats_one_shot_masked_finetuning_at_high_sparsity():
    model, loader = _trained()

    def accuracy(m):
        with torch.no_grad():
            return sum(int((m(x).argmax(1) == y).sum()) for x, y in loader) / 256

    results = {}
    for rec in (FineTune(loader, epochs=6, lr=1e-2), GradualPrune(loader, epochs=6, lr=1e-2)):
        candidate = apply(_plan(0.93), model)
        torch.manual_seed(0)
        rec(candidate)
        results[type(rec).__name__] = accuracy(candidate)
    assert results["GradualPrune"] > results["FineTune"]


def test_with_quantization_the_file_holds_what_was_trained():
    model, loader = _trained()
    plan = _plan(0.6, quantize=True)
    candidate = apply(plan, model)
    GradualPrune(loader, epochs=2, lr=1e-2)(candidate)
    loaded = load_model(io.BytesIO(to_bytes(candidate, plan)))
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x), candidate(x), atol=1e-5)


def test_inside_compress_and_as_a_tuned_recovery():
    from tightfit.recovery import Tuned

    model, loader = _trained()
    result = compress(
        copy.deepcopy(model),
        evaluate=lambda m: 1.0,
        strategy=Prune(sparsity=(0.5, 0.9)),
        constraint=MinMetric(0.0),
        objective="nonzeros",
        finetune=Tuned(GradualPrune(loader, epochs=1), ramp=(0.3, 0.9)),
        budget=2,
        search="random",
        seed=0,
    )
    assert result.feasible and result.best_trial.measurement.nonzeros < 8 * 32 + 32 * 4


def test_bad_settings_and_unpruned_models_are_clear_errors():
    model, loader = _trained()
    with pytest.raises(ConfigError, match="ramp"):
        GradualPrune(loader, ramp=0.0)
    with pytest.raises(ConfigError, match="final_lr"):
        GradualPrune(loader, final_lr=2.0)
    with pytest.raises(ConfigError, match="optimizer"):
        GradualPrune(loader, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="no pruning masks"):
        GradualPrune(loader, epochs=1)(copy.deepcopy(model))


def test_a_model_pruned_before_keeps_its_zeros_from_the_first_step():
    model, loader = _trained()
    with torch.no_grad():  # an earlier round left half of the first layer at exactly zero
        w = model[0].weight
        w.mul_(w.abs() > w.abs().median())
    candidate = apply(_plan(0.8), model)
    mask = candidate[0].parametrizations.weight[0].mask
    seen = []

    def loss(m, batch):
        seen.append(float((mask == 0).float().mean()))
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    GradualPrune(loader, epochs=2, lr=1e-2, update_every=1, loss=loss)(candidate)
    assert seen[0] == pytest.approx(0.5, abs=0.01) and seen[-1] == pytest.approx(0.8, abs=0.01)
