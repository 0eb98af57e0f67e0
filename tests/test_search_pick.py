"""The final pick (search/pick.py): robust to a lucky measurement at the constraint's edge."""

from __future__ import annotations

import numpy as np
import optuna
import torch
from torch import nn

import tightfit
from tightfit.operators import Compose, Prune
from tightfit.operators.base import Hyperparameter
from tightfit.search.encoding import distributions
from tightfit.search.pick import MIN_TRIALS, pick_note, posterior_pick
from tightfit.search.space import Dimension, SearchSpace

SE = 0.01  # the metric's standard error on every trial (binomial, a few hundred samples)


def space(n: int = 2) -> SearchSpace:
    dims = tuple(Dimension(f"l{i}", "prune", Hyperparameter("sparsity", low=0.0, high=1.0)) for i in range(n))
    return SearchSpace(Compose([Prune()]), dims, {f"l{i}": {"prune": {}} for i in range(n)})


def study_of(points, violations, se=SE) -> optuna.Study:
    """Trials at ``points`` (sparsities), objective = remaining weights, given constraint values."""
    sp = space(len(points[0]))
    dists = distributions(sp)
    study = optuna.create_study()
    for x, v in zip(points, violations):
        params = {d.key: float(xi) for d, xi in zip(sp.dimensions, x)}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                values=[float(np.sum(1 - np.asarray(x)))],
                constraints={"0": float(v)},
                user_attrs={"metric_se": se} if se is not None else {},
            )
        )
    return study


def noisy_edge_study(seed: int = 0, lucky: tuple[float, float] = (0.85, 0.85)):
    """True constraint: feasible while the mean sparsity <= 0.6; measurements carry SE noise. One
    isolated plan deep in the infeasible region measured feasible by luck."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.2, 1.0, size=(40, 2))
    true = lambda p: 0.2 * (p.mean(-1) - 0.6)  # noqa: E731
    observed = true(points) + SE * rng.standard_normal(len(points))
    points = np.vstack([points, np.asarray(lucky)[None]])
    observed = np.append(observed, -0.001)  # true value there: +0.05 (5 SE), measured just feasible
    return study_of(points, observed), len(points) - 1


def test_an_isolated_lucky_point_is_not_the_answer():
    for seed in range(3):
        study, lucky = noisy_edge_study(seed)
        pick = posterior_pick(study, space())
        assert pick.observed == lucky  # the old rule returns the lucky point...
        assert pick.number != lucky  # ...the posterior pick does not
        chosen = study.trials[pick.number]
        assert chosen.constraints["0"] <= 0  # it was observed feasible
        assert np.mean(list(chosen.params.values())) < 0.7  # and lies near the true edge (0.6)
        assert pick.mean <= 0 < pick.observed_mean
        note = pick_note(pick, study.trials)
        assert note is not None and f"Trial {lucky}" in note


def test_a_consistent_best_point_is_kept():
    # noise-free constraint: the best observed feasible trial is credible and stays the answer
    rng = np.random.default_rng(1)
    points = rng.uniform(0.0, 1.0, size=(30, 2))
    violations = 0.1 * (points.mean(-1) - 0.6)
    study = study_of(points, violations)
    pick = posterior_pick(study, space())
    assert pick.number == pick.observed
    assert pick_note(pick, study.trials) is None


def test_few_trials_or_no_noise_estimate_fall_back_sensibly():
    study, lucky = noisy_edge_study(0)
    few = study_of(
        [list(t.params.values()) for t in study.trials[: MIN_TRIALS - 1]],
        [t.constraints["0"] for t in study.trials[: MIN_TRIALS - 1]],
    )
    pick = posterior_pick(few, space())
    assert pick.number == pick.observed  # too few trials for a model
    # without metric_se the noise is learned; the answer is still an observed-feasible trial
    points = [list(t.params.values()) for t in study.trials]
    no_se = study_of(points, [t.constraints["0"] for t in study.trials], se=None)
    pick = posterior_pick(no_se, space())
    assert no_se.trials[pick.number].constraints["0"] <= 0
    # nothing feasible: no answer
    assert posterior_pick(study_of(points, [1.0] * len(points)), space()).number is None


def test_compress_returns_an_observed_feasible_trial_and_says_why_it_passed_one_over():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(loader),
        strategy=Prune(sparsity=(0.0, 0.99)),
        constraint=tightfit.MaxDrop(0.01),
        objective="nonzeros",
        budget=12,
        search="random",
        seed=0,
    )
    assert result.feasible and result.best_trial.feasible
    observed = tightfit.pipeline.best_feasible(result.trials)
    assert result.best_trial.objective >= observed.objective
    if result.best_trial.number != observed.number:
        assert any(f"Trial {observed.number}" in n for n in result.notes)


def test_clip_violation_caps_catastrophes_at_three_standard_errors_only_with_a_noise_estimate():
    from tightfit.search.gp import clip_violation

    y = np.array([-0.01, 0.002, 0.8])
    se = np.array([0.01, 0.01, 0.01])
    assert np.allclose(clip_violation(y, se), [-0.01, 0.002, 0.03])
    assert np.array_equal(clip_violation(y, None), y)
    assert np.array_equal(clip_violation(y, np.array([0.01, np.nan, 0.01])), y)


def test_pick_observed_returns_the_best_observed_trial_and_bad_values_are_refused():
    import pytest

    from tightfit.errors import ConfigError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    kwargs = dict(
        evaluate=tightfit.Accuracy(loader),
        strategy=Prune(sparsity=(0.0, 0.99)),
        constraint=tightfit.MaxDrop(0.05),
        objective="nonzeros",
        budget=21,
        search="random",
        seed=1,
    )
    result = tightfit.compress(model, pick="observed", **kwargs)
    assert result.best_trial.number == tightfit.pipeline.best_feasible(result.trials).number
    with pytest.raises(ConfigError, match="`pick` must be one of"):
        tightfit.compress(model, pick="luckiest", **kwargs)


def test_screened_or_stopped_trials_are_never_the_answer():
    study, _ = noisy_edge_study(0)
    sp = space()
    dists = distributions(sp)
    for fidelity in ("screen", "stopped"):  # predicted constraint values (cheap evaluation)
        study.add_trial(
            optuna.trial.create_trial(
                params={d.key: 0.3 for d in sp.dimensions},
                distributions=dists,
                values=[0.01],
                constraints={"0": -0.05},
                user_attrs={"metric_se": SE, "fidelity": fidelity},
            )
        )
    pick = posterior_pick(study, sp)
    assert study.trials[pick.number].user_attrs.get("fidelity") is None
    assert study.trials[pick.observed].user_attrs.get("fidelity") is None


def test_predicted_trials_inform_the_model_but_are_never_the_answer():
    """Cheap evaluation's stopped and screened trials carry predicted constraint values with their
    spread as metric_se: they join the model as noisy points, so a run with few measured trials
    still gets the posterior pick, and they are never returned."""
    study, lucky = noisy_edge_study(0)
    sp = space()
    dists = distributions(sp)
    predicted = optuna.create_study()
    for t in study.trials:
        # most trials predicted (fewer than MIN_TRIALS measured), the lucky one measured
        fidelity = "full" if t.number == lucky or t.number % 3 == 0 else "stopped"
        predicted.add_trial(
            optuna.trial.create_trial(
                params=t.params,
                distributions=dists,
                values=t.values,
                constraints=t.constraints,
                user_attrs={
                    "metric_se": SE,
                    "fidelity": fidelity,
                    **({"prediction_se": SE} if fidelity != "full" else {}),
                },
            )
        )
    measured = sum(t.user_attrs["fidelity"] == "full" for t in predicted.trials)
    assert measured < MIN_TRIALS
    pick = posterior_pick(predicted, sp)
    assert pick.observed == lucky and pick.number != lucky  # the model ran and passed over the lucky point
    assert predicted.trials[pick.number].user_attrs["fidelity"] == "full"  # a prediction is never returned
    assert predicted.trials[pick.number].constraints["0"] <= 0
