"""`bo` does not spend a trial on a plan it has measured already (with the same seed a plan
measured again gives the same result)."""

import numpy as np
import pytest
import torch

import tightfit
from tightfit.operators import Compose, Prune, Quantize
from tightfit.search.bo import GP_ATTR, SAME_PLAN, _already_measured, _best_unmeasured


def test_a_plan_is_measured_already_when_every_coordinate_is_that_close():
    seen = np.array([[0.2, 0.5], [0.9, 0.1]])
    assert _already_measured(np.array([0.2 + SAME_PLAN / 2, 0.5]), seen)
    assert not _already_measured(np.array([0.2 + 2 * SAME_PLAN, 0.5]), seen)
    assert not _already_measured(np.array([0.2, 0.5]), np.zeros((0, 2)))


def test_the_best_unmeasured_point_of_the_box_replaces_a_measured_one():
    peak = np.array([0.30, 0.60])  # the acquisition is highest at a plan measured already

    def acq(X):  # batch x q=1 x d -> batch
        return -((X.squeeze(-2) - torch.as_tensor(peak)) ** 2).sum(-1)

    lo, hi = np.array([0.2, 0.5]), np.array([0.4, 0.7])
    x = _best_unmeasured(acq, lo, hi, peak[None], n=256, seed=0, fallback=peak)
    assert not _already_measured(x, peak[None]) and np.all(x >= lo) and np.all(x <= hi)
    assert np.abs(x - peak).max() < 0.02  # still the acquisition's best region
    # the same call gives the same point (a resumed run suggests what an uninterrupted one did)
    assert np.array_equal(x, _best_unmeasured(acq, lo, hi, peak[None], n=256, seed=0, fallback=peak))
    # nothing unmeasured in a box smaller than one plan: keep the optimizer's answer
    tiny = np.array([SAME_PLAN / 4, SAME_PLAN / 4])
    assert np.array_equal(
        _best_unmeasured(acq, peak - tiny, peak + tiny, peak[None], n=16, seed=0, fallback=peak), peak
    )


@pytest.mark.slow
def test_bo_suggests_no_plan_twice(mlp, digits, tmp_path):
    import optuna

    tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Compose([Prune(sparsity=(0.0, 0.95)), Quantize(bits=(4, 8))]),
        constraint=tightfit.MaxDrop(0.02),
        budget=20,
        search="bo",
        seed=1,
        run_dir=tmp_path / "run",
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    trials = study.get_trials()
    assert any(GP_ATTR in t.system_attrs for t in trials)  # the model-based phase ran
    for i, t in enumerate(trials):
        if GP_ATTR not in t.system_attrs:
            continue  # the warm start's plans
        for earlier in trials[:i]:
            same = all(
                abs(t.params[k] - earlier.params[k]) < SAME_PLAN
                if isinstance(t.params[k], float)
                else t.params[k] == earlier.params[k]
                for k in t.params
            )
            assert not same, (t.number, earlier.number)


def _bits_only(layers: int, bits: tuple[int, ...]):
    """A bit-width-only space and an evaluator: objective = bits summed, feasible while the bits
    lost (8 - b per layer) stay under 7, so the incumbent sits among few plans."""
    from tightfit.operators.base import Hyperparameter
    from tightfit.search import SearchSpace
    from tightfit.search.context import SearchContext
    from tightfit.search.loop import TrialOutcome
    from tightfit.search.space import Dimension

    names = [f"l{i}" for i in range(layers)]
    dims = tuple(Dimension(n, "quantize", Hyperparameter("bits", choices=bits)) for n in names)
    space = SearchSpace(Compose([Quantize(bits=bits)]), dims, {n: {"quantize": {}} for n in names})

    def evaluate(plan, trial):
        widths = [plan.layers[n]["quantize"]["bits"] for n in names]
        return TrialOutcome(objective=float(sum(widths)), constraints=[sum(8 - b for b in widths) - 7.0])

    return SearchContext(space=space, budget=0, seed=0), evaluate


def _plans(study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]


@pytest.mark.parametrize(("layers", "bits", "budget", "expected"), [(3, (2, 4, 6, 8), 24, 24), (2, (4, 8), 10, 4)])
def test_bo_measures_no_plan_twice_when_its_trust_region_is_measured_out(layers, bits, budget, expected):
    """3 layers x 4 bit widths: a trust region around the incumbent holds a handful of plans, fewer
    than the budget (before this fix these 24 trials measured 8 distinct plans); 2 layers x 2 widths: all
    4 plans are measured, then the search stops (before: 10 trials, 2 distinct plans)."""
    import dataclasses

    import optuna

    from tightfit.search import run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    context, evaluate = _bits_only(layers, bits)
    context = dataclasses.replace(context, budget=budget)
    study = optuna.create_study()
    run_trials(study, context.space, evaluate, budget=budget, method="bo", seed=0, context=context)
    plans = _plans(study)
    assert len(plans) == expected and len(set(plans)) == len(plans)
