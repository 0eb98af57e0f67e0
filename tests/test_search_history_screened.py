"""A plan cheap evaluation only screened (PRUNED, no constraint values) is not proposed again: the
plan samplers see it as a point already taken (measured on fmnist-resnet: without this, `bo`
proposed one screened plan for 24 trials in a row)."""

from __future__ import annotations

import numpy as np
import optuna

from tightfit.operators import Compose, Prune
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
