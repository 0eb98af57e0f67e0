"""Issue 18: where the strategy prunes by magnitude, ``bo`` bisects one global magnitude threshold
after the uniform floor: every pruned layer's sparsity is the share of its weights at or below that
threshold. Calibrated, N:M and structured pruning get no such family."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

import tightfit
from tightfit.measure.analysis import analyze
from tightfit.operators import Compose, Prune, Quantize
from tightfit.search.bo import global_trials, uniform_trials
from tightfit.search.context import SearchContext
from tightfit.search.encoding import UnitEncoding
from tightfit.search.magnitude import global_magnitude_family
from tightfit.search.space import build_space

BUDGET = 12


def context_for(model: torch.nn.Module, strategy: Compose) -> SearchContext:
    space = build_space(strategy, analyze(model))
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return SearchContext(space=space, budget=BUDGET, weights=weights)


def sparsities(plan_layers: dict, names: list[str]) -> list[float]:
    return [plan_layers[n]["prune"]["sparsity"] for n in names]


def one_threshold(model: torch.nn.Module, spars: list[float], names: list[str]) -> bool:
    """Whether pruning each layer at its sparsity removes exactly the weights at or below one
    magnitude: the largest removed magnitude of any layer is below the smallest kept one of any."""
    mods = dict(model.named_modules())
    removed, kept = [], []
    for name, s in zip(names, spars):
        mags = np.sort(mods[name].weight.detach().abs().reshape(-1).numpy())
        k = int(round(s * len(mags)))
        removed.append(mags[k - 1] if k else -np.inf)
        kept.append(mags[k] if k < len(mags) else np.inf)
    return max(removed) <= min(kept) and any(s > 0 for s in spars)


def test_the_family_prunes_every_layer_at_one_threshold(mlp):
    context = context_for(mlp, Compose([Prune(), Quantize(bits=(2, 8))]))
    enc = UnitEncoding(context.space)
    family = global_magnitude_family(context, enc)
    assert family is not None
    names = [n for n, m in mlp.named_modules() if isinstance(m, torch.nn.Linear)]
    previous = -1.0
    for knob in (0.1, 0.3, 0.5, 0.9):
        layers = context.space.plan(enc.decode(family(knob))).to_dict()["layers"]
        spars = sparsities(layers, names)
        assert one_threshold(mlp, spars, names), (knob, spars)
        assert len(set(np.round(spars, 3))) > 1  # not the uniform family: layers differ
        assert all(v["quantize"]["bits"] == 8 for v in layers.values())  # other dimensions gentle
        total = sum(s * dict(mlp.named_modules())[n].weight.numel() for s, n in zip(spars, names))
        assert total > previous  # a larger knob removes more
        previous = total


@pytest.mark.parametrize(
    "prune", [Prune(method="wanda"), Prune(pattern="2:4"), Prune(method="sparsegpt")], ids=["wanda", "2:4", "sparsegpt"]
)
def test_no_family_without_unstructured_magnitude_pruning(mlp, prune):
    context = context_for(mlp, Compose([prune, Quantize(bits=(2, 8))]))
    assert global_magnitude_family(context, UnitEncoding(context.space)) is None
    quantize_only = context_for(mlp, Compose([Quantize(bits=(2, 4, 8))]))
    assert global_magnitude_family(quantize_only, UnitEncoding(quantize_only.space)) is None


def test_bo_trials_bisect_the_global_threshold_after_the_uniform_floor(mlp, digits):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 256)),
        strategy=Compose([Prune(), Quantize(bits=(2, 8))]),
        constraint=tightfit.MaxDrop(0.02),
        finetune=None,
        budget=BUDGET,
        search="bo",
        seed=0,
    )
    names = [n for n, m in mlp.named_modules() if isinstance(m, torch.nn.Linear)]
    plans = [sparsities(t.plan.to_dict()["layers"], names) for t in result.trials]
    floor = uniform_trials(BUDGET)
    # the uniform floor first: the same sparsity in every layer
    assert all(max(p) - min(p) < 1e-9 for p in plans[:floor])
    # then the global bisection: distinct plans, each at one threshold, layers at different sparsities
    glob = [p for p in plans[floor : floor + global_trials(BUDGET)] if one_threshold(mlp, p, names)]
    assert len(glob) >= 2 and all(max(p) - min(p) > 1e-3 for p in glob)
    assert len({tuple(p) for p in glob}) == len(glob)


def test_bo_skips_the_sensitivity_warm_start_after_a_feasible_global_bisection(mlp, digits):
    # on fmnist-resnet and fmnist-mobilenet the warm start found nothing the global bisection had
    # not, and its scan cost a quarter of the run: its probes and trials go to BO instead
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = dict(
        evaluate=tightfit.Accuracy(digits.loader("val", 256)),
        constraint=tightfit.MaxDrop(0.02),
        finetune=None,
        budget=BUDGET + 4,
        search="bo",
        seed=0,
    )
    pruned = tightfit.compress(mlp, strategy=Compose([Prune(), Quantize(bits=(2, 8))]), **args)
    glob = slice(uniform_trials(BUDGET + 4), uniform_trials(BUDGET + 4) + global_trials(BUDGET + 4))
    assert any(t.feasible for t in pruned.trials[glob])
    assert pruned.accounting["val_samples_probes"] == 0  # no sensitivity scan
    # without a global family (bit widths only) the warm start still runs, probes and all
    quantized = tightfit.compress(mlp, strategy=Compose([Quantize(bits=(2, 4, 8))]), **args)
    assert quantized.accounting["val_samples_probes"] > 0
