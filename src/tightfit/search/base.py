"""Common ground of tightfit's own samplers: the trials as arrays in the unit cube, and the
Optuna plumbing (relative search space = the whole plan space, independent sampling = random)."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from ..run_dir import FIDELITY_ATTR, INCUMBENT_ATTR, METRIC_SE_ATTR  # noqa: F401 (INCUMBENT_ATTR: for samplers)
from .context import SearchContext
from .encoding import UnitEncoding, distributions, in_space

# METRIC_SE_ATTR: the standard error of a trial's metric estimate (set by cheap evaluation); GP
# models use its square as the observed noise of the constraint. INCUMBENT_ATTR: trial system
# attribute a sampler may set with its suggestion: the objective of the answer it is working from
# (``bo``: the best trial its constraint model also believes feasible, which is not the best
# observed one when that one met the constraint by luck). Cheap evaluation promotes the candidates
# that improve on it, so the search and the evaluation chase the same incumbent.


@dataclass(frozen=True)
class History:
    """Completed trials of the study as arrays: ``x`` is ``n x d`` in the unit cube, ``objective``
    the value minimized, ``violation`` the largest constraint value (<= 0 feasible), ``se`` the
    metric's standard error or NaN. ``pending`` (``m x d``) are points running elsewhere or screened;
    ``screened`` those of them cheap evaluation only screened (PRUNED); ``failed`` points whose
    evaluation raised. ``margin``: what a trial's violation must clear to count as feasible in a
    yes/no decision (``judged``): its standard error for cheap evaluation's capped trials (estimates
    on a subsample), 0 for the others; models read the violation itself, with its noise."""

    x: np.ndarray
    objective: np.ndarray
    violation: np.ndarray
    se: np.ndarray
    pending: np.ndarray
    failed: np.ndarray
    screened: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    margin: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.objective)

    @property
    def judged(self) -> np.ndarray:
        """The violation a yes/no decision reads: a capped trial's estimate must be one standard
        error inside the limit. Its estimate at the edge is the luckiest of its neighbours': read by
        its sign, the bisections stepped past the edge on a few lucky estimates (fmnist-resnet,
        ``trial_samples=1024``: plans 6.5x smaller estimated feasible where the edge is 5.4x,
        docs/evidence.md, "Capped trials")."""
        return self.violation if self.margin is None else self.violation + self.margin

    @property
    def feasible(self) -> np.ndarray:
        return self.judged <= 0

    def best_feasible(self) -> int | None:
        if not self.feasible.any():
            return None
        idx = np.flatnonzero(self.feasible)
        return int(idx[np.argmin(self.objective[idx])])


def _violation(t: FrozenTrial) -> float:
    cons = t.constraints
    if not cons:
        return 0.0
    return max(float(v) for v in cons.values())


def collect_history(study: optuna.Study, trial: FrozenTrial, enc: UnitEncoding) -> History:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and in_space(t, enc.keys) and t.values]
    pending = [
        t for t in trials if t.state == TrialState.RUNNING and t.number != trial.number and in_space(t, enc.keys)
    ]
    # a plan cheap evaluation only screened (PRUNED: no constraint values) is not in `done`; without it
    # here a sampler proposed the same screened plan again and again (fmnist-resnet, finetune=None,
    # Sequential(): trials 6-29 all one 339 KB plan). As pending, it is a point not to propose again.
    screened = [t for t in trials if t.state == TrialState.PRUNED and in_space(t, enc.keys)]
    pending += screened
    failed = [t for t in trials if t.state == TrialState.FAIL and in_space(t, enc.keys)]

    def rows(ts):
        return np.array([enc.encode(t.params) for t in ts]).reshape(len(ts), enc.d)

    se = [t.user_attrs.get(METRIC_SE_ATTR) for t in done]
    capped = [t.user_attrs.get(FIDELITY_ATTR) == "capped" for t in done]
    margin = np.array([float(s or 0.0) if c else 0.0 for s, c in zip(se, capped)]) if any(capped) else None
    return History(
        x=rows(done),
        objective=np.array([float(t.values[0]) for t in done]),
        violation=np.array([_violation(t) for t in done]),
        se=np.array([float(s) if s is not None else math.nan for s in se]),
        pending=rows(pending),
        failed=rows(failed),
        screened=rows(screened),
        margin=margin,
    )


class PlanSampler(BaseSampler, abc.ABC):
    """A sampler over the whole plan space at once. Subclasses implement :meth:`propose`, which
    returns a point of the unit cube (or None to fall back to random sampling)."""

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.encoding = UnitEncoding(context.space)
        self.rng = np.random.default_rng(context.seed)
        self._fallback = RandomSampler(seed=context.seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return distributions(self.context.space) if self.encoding.d else {}

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        from .gp import one_thread

        history = collect_history(study, trial, self.encoding)
        with one_thread():
            x = self.propose(history, study)
        if x is None:
            return {}
        return self.encoding.decode(np.asarray(x, dtype=float))

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    @abc.abstractmethod
    def propose(self, history: History, study: optuna.Study) -> np.ndarray | None:
        """The next point of ``[0, 1]^d`` to evaluate, given the history."""
