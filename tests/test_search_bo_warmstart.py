"""``bo`` warm-starts each GP fit from the hyperparameters the previous trial fitted (stored on the
trial): a resumed or interrupted run still suggests exactly what an uninterrupted one does, and a
warm-started fit reaches the likelihood of a cold one."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from test_search_conformance import context, evaluate, synthetic_space

from tightfit.search import run_trials
from tightfit.search.bo import COLD_EVERY, GP_ATTR
from tightfit.search.gp import (
    WARM_MAXITER,
    fit_gp,
    hyperparameters,
    load_hyperparameters,
    marginal_log_likelihood,
)

BUDGET = 12


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(storage: str | None = None, budget: int = BUDGET, evaluate_plan=evaluate) -> optuna.Study:
    space = synthetic_space()
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    run_trials(study, space, evaluate_plan, budget=budget, method="bo", seed=3, context=context(space, BUDGET))
    return study


def completed_params(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.get_trials() if t.state == TrialState.COMPLETE]


@pytest.fixture(scope="module")
def whole() -> optuna.Study:
    """The uninterrupted run both resume tests compare against."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return run()


def test_fits_are_stored_and_resumed_runs_suggest_the_same(tmp_path, whole):
    trials = whole.get_trials()
    stored = [t for t in trials if GP_ATTR in t.system_attrs]
    # every BO step (after the uniform bisection, up to 3 trials at this budget, and the level-set
    # warm start, 2) stores both GPs' hyperparameters
    assert len(stored) >= BUDGET - 5
    for t in stored:
        assert set(t.system_attrs[GP_ATTR]) == {"objective", "constraint"}
        assert all(np.isfinite(v).all() for v in t.system_attrs[GP_ATTR]["constraint"].values())
    # warm-started steps happened (COLD_EVERY leaves most steps warm)
    assert len(stored) > BUDGET // COLD_EVERY + 1

    url = f"sqlite:///{tmp_path}/split.db"
    for part in (6, 8):  # stopped twice, each time inside the BO phase
        run(storage=url, budget=part)
    resumed = run(storage=url)
    assert completed_params(resumed) == completed_params(whole)


def test_interrupted_trial_is_retried_and_the_run_matches(tmp_path, whole):
    calls = {"n": 0}

    def interrupt_once(plan, trial):
        calls["n"] += 1
        if calls["n"] == 7:  # a BO step: its suggestion (and stored fit) exist, its evaluation dies
            raise KeyboardInterrupt
        return evaluate(plan, trial)

    url = f"sqlite:///{tmp_path}/interrupted.db"
    with pytest.raises(KeyboardInterrupt):
        run(storage=url, evaluate_plan=interrupt_once)
    resumed = run(storage=url)
    assert any(t.user_attrs.get("interrupted") for t in resumed.get_trials())
    assert completed_params(resumed) == completed_params(whole)


def _synthetic(n: int, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, d))
    y = np.sin(6 * x[:, 0]) + 0.5 * x[:, 1] ** 2 - x[:, 2] + 0.05 * rng.normal(size=n)
    return x, y


def test_warm_started_fit_is_as_good_as_a_cold_one():
    x, y = _synthetic(25)
    for n in (12, 18, 24):
        previous = hyperparameters(fit_gp(x[: n - 1], y[: n - 1]))
        cold = marginal_log_likelihood(fit_gp(x[:n], y[:n]))
        warm = marginal_log_likelihood(fit_gp(x[:n], y[:n], init=previous, maxiter=WARM_MAXITER))
        assert warm >= cold - 1e-3, (n, warm, cold)
    # a fit's own hyperparameters are a fixed point: refitting from them changes nothing much
    model = fit_gp(x, y)
    again = fit_gp(x, y, init=hyperparameters(model))
    assert marginal_log_likelihood(again) == pytest.approx(marginal_log_likelihood(model), abs=1e-4)


def test_hyperparameters_round_trip_and_mismatches_are_refused():
    x, y = _synthetic(15)
    fitted = fit_gp(x, y)
    values = hyperparameters(fitted)
    fresh = fit_gp(x, y, maxiter=1)
    assert load_hyperparameters(fresh, values)
    assert hyperparameters(fresh) == values
    # a stored fit that went wrong (non-finite) is not a starting point
    broken = {k: [float("nan")] * len(v) for k, v in values.items()}
    assert not load_hyperparameters(fresh, broken)
    assert hyperparameters(fresh) == values
    # another input dimension: the lengthscales do not fit, the model keeps its own
    x4, _ = _synthetic(15, d=4)
    other = fit_gp(x4, y, maxiter=1)
    before = hyperparameters(other)
    assert not load_hyperparameters(other, values)
    assert hyperparameters(other) == before
    # fixed observation noise (metric_se) has no noise parameter: refused as well
    with_se = fit_gp(x, y, np.full(15, 0.05), maxiter=1)
    assert not load_hyperparameters(with_se, values)


def test_bo_acquisition_equals_botorchs_constrained_log_ei():
    """bo computes each GP's posterior on its own inside LogConstrainedExpectedImprovement (faster
    on a ModelListGP; since branch fastbo2 with gp.FastPosterior); the values must be BoTorch's."""
    import torch
    from botorch.acquisition.analytic import LogConstrainedExpectedImprovement
    from botorch.models import ModelListGP

    from tightfit.search.bo import _independent_log_cei

    x, y = _synthetic(20)
    rng = np.random.default_rng(1)
    model = ModelListGP(fit_gp(x, y), fit_gp(x, x.sum(1) - 1.5, np.full(20, 0.05)))
    ours = _independent_log_cei()(model, best_f=float(y.max()), objective_index=0, constraints={1: (None, 0.0)})
    theirs = LogConstrainedExpectedImprovement(
        model, best_f=float(y.max()), objective_index=0, constraints={1: (None, 0.0)}
    )
    X = torch.as_tensor(rng.uniform(size=(64, 1, 3)))
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), rtol=1e-10, atol=1e-10)  # rounding: values reach -1e3
