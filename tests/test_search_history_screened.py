"""A plan cheap evaluation only screened (PRUNED, no constraint values) is not proposed again: the
plan samplers see it as a point already taken (measured on fmnist-resnet: without this, `bo`
proposed one screened plan for 24 trials in a row)."""

from __future__ import annotations

import numpy as np
import optuna

from tightfit.operators import Compose, Prune, Quantize
from tightfit.operators.base import Hyperparameter
from tightfit.search.base import collect_history
from tightfit.search.encoding import UnitEncoding, distributions
from tightfit.search.space import Dimension, SearchSpace


def test_screened_trials_are_points_not_to_propose_again():
    dims = tuple(Dimension(f"l{i}", "prune", Hyperparameter("sparsity", low=0.0, high=1.0)) for i in range(2))
    space = SearchSpace(Compose([Prune()]), dims, {f"l{i}": {"prune": {}} for i in range(2)})
    dists = distributions(space)
    study = optuna.create_study()
    keys = [d.key for d in dims]
    study.add_trial(
        optuna.trial.create_trial(
            params=dict(zip(keys, (0.2, 0.3))), distributions=dists, values=[1.5], constraints={"0": -0.1}
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            params=dict(zip(keys, (0.1, 0.1))), distributions=dists, state=optuna.trial.TrialState.PRUNED
        )
    )
    enc = UnitEncoding(space)
    asking = study.ask()
    history = collect_history(study, study.get_trials(deepcopy=False)[-1], enc)
    assert history.n == 1  # the model of the constraint learns from measured trials only
    assert len(history.pending) == 1  # ...but the screened plan is taken
    assert np.allclose(history.pending[0], enc.encode(dict(zip(keys, (0.1, 0.1)))))
    study.tell(asking, 1.0)


def test_bos_uniform_bisection_does_not_propose_a_screened_plan_again():
    # a bisection step no smaller than cheap evaluation's incumbent is only screened (PRUNED, not in
    # the history's rows); counted as feasible, the bisection moves past it. Before, it proposed the
    # same plan until the budget ran out (fmnist-resnet, trial_samples=1024: 26 trials of one plan)
    from tightfit.search.base import History
    from tightfit.search.bo import BOSampler
    from tightfit.search.context import SearchContext
    from tightfit.search.levelset import uniform_family

    dims = tuple(Dimension(f"l{i}", "prune", Hyperparameter("sparsity", low=0.0, high=1.0)) for i in range(2))
    dims += tuple(Dimension(f"l{i}", "quantize", Hyperparameter("bits", choices=(2, 4, 8))) for i in range(2))
    ops = {"prune": {}, "quantize": {}}
    space = SearchSpace(Compose([Prune(), Quantize(bits=(2, 4, 8))]), dims, {f"l{i}": ops for i in range(2)})
    sampler = BOSampler(SearchContext(space=space, budget=30))
    enc = sampler.encoding
    family = uniform_family(enc)
    measured = np.vstack([family(0.2), family(0.9)])
    none = np.zeros((0, enc.d))

    def history(screened):
        return History(
            x=measured,
            objective=np.array([2.0, 1.0]),
            violation=np.array([-0.1, 0.1]),
            se=np.full(2, np.nan),
            pending=screened,
            failed=none,
            screened=screened,
        )

    _, knob = sampler._uniform_phase(history(none))
    assert knob is not None
    # as the trial stores it: a bit width's coordinate at its slice's own point, not the family's
    proposed = enc.encode(enc.decode(family(knob)))
    _, again = sampler._uniform_phase(history(proposed[None, :]))
    assert again is None or not np.allclose(enc.encode(enc.decode(family(again))), proposed)
