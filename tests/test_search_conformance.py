"""One conformance suite every registered search method passes, on a cheap synthetic problem run
through the real search loop (``run_trials``) and a stored (SQLite) Optuna study."""

from __future__ import annotations

import math

import optuna
import pytest

from tightfit.operators import Compose, Prune, Quantize
from tightfit.operators.base import Hyperparameter
from tightfit.search import SAMPLERS, SearchSpace, run_trials
from tightfit.search.context import ProbeResult, SearchContext
from tightfit.search.loop import TrialOutcome, counted_trials
from tightfit.search.space import Dimension

SIZES = {"a": 100, "b": 300, "c": 50}
BUDGET = 6


def synthetic_space() -> SearchSpace:
    strategy = Compose([Prune(sparsity=(0.0, 0.99)), Quantize(bits=(2, 4, 8))])
    dims = [Dimension(name, "prune", Hyperparameter("sparsity", low=0.0, high=0.99)) for name in SIZES]
    dims.append(Dimension("a", "quantize", Hyperparameter("bits", choices=(2, 4, 8))))
    fixed = {name: {"prune": {}, "quantize": {"bits": 8}} for name in SIZES}
    fixed["a"] = {"prune": {}, "quantize": {}}
    return SearchSpace(strategy, tuple(dims), fixed)


def measure(plan) -> tuple[float, float, float]:
    """(objective, metric, constraint) of a plan: bits x kept weights; the metric falls steeply
    with sparsity of the sensitive layer b; feasible when the metric stays above 0.9."""
    s = {name: plan.layers[name]["prune"]["sparsity"] for name in SIZES}
    bits = plan.layers["a"]["quantize"]["bits"]
    objective = sum(SIZES[n] * (1 - s[n]) * (bits if n == "a" else 8) for n in SIZES)
    metric = 1.0 - 0.5 * s["b"] ** 6 - 0.1 * s["a"] ** 8 - 0.05 * s["c"] ** 2 - (0.03 if bits == 2 else 0.0)
    return objective, metric, 0.9 - metric


def evaluate(plan, trial) -> TrialOutcome:
    objective, metric, constraint = measure(plan)
    return TrialOutcome(objective=objective, constraints=[constraint], attrs={"metric": metric})


def context(space: SearchSpace, budget: int = BUDGET) -> SearchContext:
    def probe(plan) -> ProbeResult:
        objective, metric, constraint = measure(plan)
        return ProbeResult(metric - 0.02, (constraint + 0.02,), objective)

    return SearchContext(space=space, budget=budget, probe=probe)


def run(method: str, storage: str | None = None, budget: int = BUDGET, seed: int = 0, evaluate_plan=evaluate):
    space = synthetic_space()
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    run_trials(study, space, evaluate_plan, budget=budget, method=method, seed=seed, context=context(space, budget))
    return study


METHODS = sorted(SAMPLERS)


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("method", METHODS)
def test_in_bounds_reproducible_and_resumable(method, tmp_path):
    """Suggestions stay inside the space; the same seed gives the same trials; a run stopped half
    way and resumed from its SQLite study suggests what the uninterrupted run did."""
    whole = run(method)
    trials = whole.get_trials()
    assert len(trials) == BUDGET
    for t in trials:
        for name in SIZES:
            assert 0.0 <= t.params[f"{name}/prune/sparsity"] <= 0.99
        assert t.params["a/quantize/bits"] in (2, 4, 8)
        assert t.user_attrs["search_time_s"] >= 0.0
        assert t.constraints  # the constraint reached the stored trial
    url = f"sqlite:///{tmp_path}/split.db"
    run(method, storage=url, budget=BUDGET // 2)
    split = run(method, storage=url)  # a new study object on the stored trials
    assert [t.params for t in split.get_trials()] == [t.params for t in trials]


@pytest.mark.parametrize("method", METHODS)
def test_copes_with_failures_and_no_feasible_point(method):
    calls = {"n": 0}

    def harsh(plan, trial):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("evaluation broke")
        objective, metric, _ = measure(plan)
        return TrialOutcome(objective=objective, constraints=[1.0 - metric + 5.0], attrs={})

    study = run(method, evaluate_plan=harsh)
    states = [t.state for t in study.get_trials()]
    assert len(counted_trials(study)) == BUDGET
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.COMPLETE in states


def test_constraint_aware_methods_find_feasible_plans():
    """With 10 evaluations the constraint-aware methods end at a feasible plan that compresses
    (objective below 70% of the uncompressed 8 x 450)."""
    uncompressed = sum(n * 8 for n in SIZES.values())
    for method in ("bo", "levelset", "mads", "olmp"):
        study = run(method, budget=10)
        feasible = [t for t in study.get_trials() if t.state.name == "COMPLETE" and t.constraints["0"] <= 0]
        assert feasible, method
        best = min(t.value for t in feasible)
        assert best < 0.7 * uncompressed, (method, best)
        assert math.isfinite(best)
