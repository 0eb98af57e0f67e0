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
