"""Each search method's own behaviour, on cheap synthetic functions."""

from __future__ import annotations

import math

import numpy as np
import optuna
import torch

import tightfit
from tightfit.operators import Compose, Prune
from tightfit.operators.base import Hyperparameter
from tightfit.search import SearchSpace, make_sampler, register_search
from tightfit.search.base import History
from tightfit.search.bo import trust_region_length
from tightfit.search.context import ProbeResult, SearchContext
from tightfit.search.gp import fit_gp
from tightfit.search.levelset import next_knob
from tightfit.search.olmp import OLMPSampler
from tightfit.search.samplers import SAMPLERS, auto_method
from tightfit.search.sensitivity import sensitivity_scan
from tightfit.search.space import Dimension


def prune_space(n: int) -> SearchSpace:
    dims = tuple(Dimension(f"l{i}", "prune", Hyperparameter("sparsity", low=0.0, high=0.99)) for i in range(n))
    return SearchSpace(Compose([Prune()]), dims, {f"l{i}": {"prune": {}} for i in range(n)})


def test_levelset_finds_the_edge_of_a_noisy_level_set_in_ten_evaluations():
    boundary = 0.731

    def violation(u: float) -> float:  # feasible below the boundary, with a ripple of noise
        return (u - boundary) + 0.004 * math.sin(97 * u)

    u, c = [], []
    for _ in range(10):
        knob = next_knob(np.array(u), np.array(c), None, start=0.3)
        u.append(knob)
        c.append(violation(knob))
    best = max(k for k, v in zip(u, c) if v <= 0)
    assert abs(best - boundary) <= 0.02


def test_levelset_never_walks_past_a_clear_failure():
    # the shape of bo's warm start on fmnist-resnet: three feasible knobs just under a plan that
    # lost 30 points; the GP's mean falls back to the prior beyond it and once sent the next knobs
    # to the end of the range (plans that lost 80 points)
    u = np.array([0.2, 0.3, 0.35, 0.6])
    violation = np.array([-0.003, -0.002, -0.001, 0.30])
    se = np.full(4, 0.002)
    for _ in range(6):
        knob = next_knob(u, violation, se, start=0.6)
        assert 0.35 <= knob < 0.6
        u, violation = np.append(u, knob), np.append(violation, (knob - 0.45) * 0.1)
        se = np.append(se, 0.002)
    # a failure within noise (here, 2 standard errors over the limit) does not close the range
    from tightfit.search.levelset import clear_failure

    assert clear_failure(np.array([0.3, 0.5]), np.array([-0.001, 0.004]), np.full(2, 0.002), best=0.3) == math.inf
    assert clear_failure(np.array([0.3, 0.5]), np.array([-0.001, 0.3]), None, best=0.3) == math.inf  # noise unknown


def test_sensitivity_family_compresses_insensitive_dimensions_first():
    space = prune_space(3)
    weight = {"l0": 0.01, "l1": 1.0, "l2": 0.2}  # l0 barely matters, l1 matters most

    def probe(plan):
        drop = sum(weight[n] * plan.layers[n]["prune"]["sparsity"] ** 3 for n in weight)
        return ProbeResult(1 - drop, (drop - 0.05,), 0.0)

    scan = sensitivity_scan(SearchContext(space=space, budget=10, probe=probe))
    assert scan.violation.shape == (3, len(scan.levels))
    xs = np.stack([scan.family(u) for u in np.linspace(0, 1, 21)])
    assert (np.diff(xs, axis=0) >= -1e-12).all()  # the knob only ever compresses more
    mid = scan.family(0.5)
    assert mid[0] >= mid[2] >= mid[1]
    assert np.allclose(scan.family(1.0), 1.0)


def test_trust_region_grows_on_successes_and_shrinks_on_failures():
    def history(objectives, violations):
        n = len(objectives)
        return History(
            np.zeros((n, 2)),
            np.array(objectives, float),
            np.array(violations, float),
            np.full(n, np.nan),
            np.zeros((0, 2)),
            np.zeros((0, 2)),
        )

    grow = trust_region_length(history([10, 9, 8, 7, 6], [0, 0, 0, 0, 0]), start=1, d=2)
    shrink = trust_region_length(history([10, 11, 12, 13, 14], [0, 1, 1, 1, 1]), start=1, d=2)
    assert grow > 0.4 > shrink


def test_gp_takes_metric_standard_error_as_observed_noise():
    x = np.linspace(0, 1, 6).reshape(-1, 1)
    se = np.full(6, 0.01)
    model = fit_gp(x, np.sin(3 * x).ravel(), se)
    noise = model.likelihood.noise.detach().numpy().ravel()
    # observed noise is fixed at se^2 (in the model's standardized units: scaled, but not learned)
    assert np.allclose(noise, noise[0]) and noise[0] < 1e-2
    learned = fit_gp(x, np.sin(3 * x).ravel(), None)
    assert type(learned.likelihood).__name__ != type(model.likelihood).__name__


def test_olmp_threshold_coefficients_map_to_layer_sparsity():
    torch.manual_seed(0)
    w = torch.randn(200, 100)
    space = prune_space(1)
    sampler = OLMPSampler(SearchContext(space=space, budget=10, weights={"l0": w}))
    s0 = sampler.sparsity(0, 0.0)  # threshold = mean |w|: ~58% of half-normal mass below it
    assert 0.5 < s0 < 0.65
    assert sampler.sparsity(0, 1.0) > s0 > sampler.sparsity(0, -1.0)
    z = np.array([0.6])
    params = sampler.to_params(z)
    assert abs(sampler.to_z(params)[0] - 0.6) < 0.01


def test_bo_batch_suggestions_avoid_running_trials():
    space = prune_space(2)
    study = optuna.create_study()
    rng = np.random.default_rng(0)
    for _ in range(6):
        s = rng.uniform(0, 0.99, 2)
        study.enqueue_trial({"l0/prune/sparsity": float(s[0]), "l1/prune/sparsity": float(s[1])})
        t = study.ask()
        space.suggest(t)
        t.set_constraint("0", float(s.sum() - 1.2))
        study.tell(t, float((1 - s).sum()))
    ctx = SearchContext(space=space, budget=10, seed=1)
    study.sampler = make_sampler("bo", 1, space, 10, ctx)
    first = study.ask()  # left running: another worker's trial
    space.suggest(first)
    study.sampler = make_sampler("bo", 2, space, 10, ctx)
    second = study.ask()
    space.suggest(second)
    a, b = np.array(list(first.params.values())), np.array(list(second.params.values()))
    assert np.abs(a - b).max() > 1e-3


def test_legacy_factories_still_register():
    register_search("legacy-random", lambda seed, space, budget: optuna.samplers.RandomSampler(seed=seed))
    try:
        sampler = make_sampler("legacy-random", 5, prune_space(1), 10)
        assert isinstance(sampler, optuna.samplers.RandomSampler)
    finally:
        SAMPLERS.pop("legacy-random")


def test_auto_picks_levelset_for_tiny_budgets_and_bo_otherwise():
    space = prune_space(3)
    assert auto_method(SearchContext(space=space, budget=8)) == "levelset"
    assert auto_method(SearchContext(space=space, budget=30)) == "bo"


def test_compress_gives_samplers_a_probe_and_records_search_time(mlp, digits):
    result = tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Prune(sparsity=(0.0, 0.95)),
        constraint=tightfit.MaxDrop(0.02),
        objective="nonzeros",
        finetune=tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3),
        budget=3,
        search="bo",
        seed=0,
    )
    assert len(result.trials) == 3 and all(t.search_time_s is not None for t in result.trials)
    # the first suggestion ran the sensitivity scan (probes), so it took longest; all compress
    assert result.trials[0].plan.layers["1"]["prune"]["sparsity"] > 0.0
    assert result.feasible and result.nonzero_ratio > 1.5


def test_pareto_search_of_size_and_metric_keeps_the_constraint(mlp, digits, tmp_path):
    result = tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Prune(sparsity=(0.0, 0.95)),
        constraint=tightfit.MaxDrop(0.02),
        objective=("size", "metric"),
        finetune=tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3),
        budget=5,
        seed=0,
        run_dir=tmp_path / "run",
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path}/run/study.db")
    assert len(study.directions) == 2
    assert all(len(t.values) == 2 for t in study.get_trials() if t.state.name == "COMPLETE")
    assert result.pareto and all(t.feasible for t in result.pareto)
    sizes = [t.measurement.size_bytes for t in result.pareto]
    metrics = [t.measurement.metric for t in result.pareto]
    assert sizes == sorted(sizes) and metrics == sorted(metrics)
    assert result.feasible and result.best_trial.measurement.size_bytes == min(sizes)
