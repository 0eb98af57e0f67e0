"""The final pick: which completed trial ``compress`` returns.

The best *observed* feasible trial is a poor answer when the constraint sits at the noise level of
the metric (e.g. "at most 0.5 points of accuracy lost" on a few hundred validation samples): a
search that measures many plans near the constraint's edge keeps the luckiest measurement, and
that plan loses more on new data (the winner's curse). Measured on the issue-3 benchmark: one
plan's validation and test drops differ by 0.66 points (s.d.), while fine-tuning the same plan with
another seed moves its validation accuracy by only 0.24 points, so re-training a front-runner
does not reveal its luck; its neighbours, measured on other draws of the noise, do.

:func:`posterior_pick` therefore asks a Gaussian-process model of the constraint over *all*
completed trials (BoTorch, the same model ``bo`` searches with) and returns the smallest-objective
trial that was observed feasible **and** whose posterior mean constraint value is <= 0 (posterior
probability of feasibility >= 0.5). A plan that met the constraint once while its neighbourhood
does not is passed over. Observation noise is the metric's standard error (``metric_se``, the
binomial standard error for accuracy) when every trial carries one, learned otherwise; constraint
values more than three standard errors above the limit are clipped there (how badly a plan fails
says nothing about where the edge is, and one catastrophic plan would otherwise set the scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from ..records import NOT_ANSWERS
from ..run_dir import FIDELITY_ATTR, MEASUREMENT_ATTR, PREDICTION_SE_ATTR
from .base import METRIC_SE_ATTR
from .encoding import UnitEncoding, in_space
from .space import SearchSpace

#: cheap evaluation's fidelities whose constraint values are predictions, not measurements: such
#: trials can never be the answer; they inform the model only when they carry the predictions'
#: spread (user attribute ``PREDICTION_SE_ATTR``, stored by cheap evaluation), as observations that noisy
NOT_MEASURED = ("screen", "stopped")
#: below this many completed trials the best observed trial stands: with fewer points the model's
#: learned mean and length scales leave even a well-supported edge uncertain, and the pick falls back
#: to plans far inside the feasible region (measured: the level-set search at 10 evaluations
#: returned 1.8x instead of 4.4x on the issue-3 benchmark)
MIN_TRIALS = 20


@dataclass(frozen=True)
class Pick:
    """The chosen trial number, the best observed feasible trial number, and the model's posterior
    mean constraint value at each (None when the model was not used)."""

    number: int | None
    observed: int | None
    mean: float | None = None
    observed_mean: float | None = None


def _violation(t: optuna.trial.FrozenTrial) -> float:
    cons = t.constraints
    return max(float(v) for v in cons.values()) if cons else 0.0


def _key(t: optuna.trial.FrozenTrial) -> tuple:
    """Smaller objective first; ties to the higher metric, then the earlier trial (as compress)."""
    metric = (t.user_attrs.get(MEASUREMENT_ATTR) or {}).get("metric")
    return (float(t.values[0]), -(metric if metric is not None else -math.inf), t.number)


def posterior_pick(study: optuna.Study, space: SearchSpace, *, min_trials: int = MIN_TRIALS) -> Pick:
    """The answer of a single-objective study (see the module docstring)."""
    data = ModelData.of(study, space)
    # a capped trial's values are estimates: it informs the model but is not the answer as it stands
    feasible = [t for t in data.measured if _violation(t) <= 0 and t.user_attrs.get(FIDELITY_ATTR) not in NOT_ANSWERS]
    if not feasible:
        return Pick(None, None)
    observed = min(feasible, key=_key)
    if len(data.done) < min_trials or data.x.shape[1] == 0:
        return Pick(observed.number, observed.number)
    fitted = data.posterior()
    if fitted is None:
        return Pick(observed.number, observed.number)
    by_number = {t.number: float(m) for t, m in zip(data.done, fitted[0])}
    credible = [t for t in feasible if by_number[t.number] <= 0]
    # none credible: the feasible trial the model trusts most
    chosen = min(credible, key=_key) if credible else min(feasible, key=lambda t: (by_number[t.number], _key(t)))
    return Pick(chosen.number, observed.number, by_number[chosen.number], by_number[observed.number])


@dataclass(frozen=True)
class Capped:
    """A capped trial (cheap evaluation's estimate on a subsample) as the verification sees it: its
    objective, and its constraint value as the model of all trials expects it (its own estimate
    when there are too few trials for a model)."""

    number: int
    objective: float
    expected: float


def capped_candidates(study: optuna.Study, space: SearchSpace, numbers: Sequence[int]) -> list[Capped]:
    """The capped trials ``numbers``, smallest objective first, each with the constraint value the
    model of all trials expects at it (posterior mean). Read on the model rather than on their own
    estimate, because the best of many noisy estimates at the edge is the luckiest one (the
    winner's curse, module docstring)."""
    data = ModelData.of(study, space)
    wanted = set(numbers)
    pool = [t for t in data.measured if t.number in wanted]
    if not pool:
        return []
    fitted = data.posterior() if len(data.done) >= MIN_TRIALS and data.x.shape[1] else None
    mean_of = {t.number: float(m) for t, m in zip(data.done, fitted[0])} if fitted is not None else {}
    return [Capped(t.number, float(t.values[0]), mean_of.get(t.number, _violation(t))) for t in sorted(pool, key=_key)]


@dataclass(frozen=True)
class ModelData:
    """What the constraint model is fitted on: the measured trials, the predicted ones it may also
    read (``done`` = those it reads), their unit-cube inputs, constraint values and standard errors
    (None unless every trial read has one)."""

    measured: list[optuna.trial.FrozenTrial]
    done: list[optuna.trial.FrozenTrial]
    x: np.ndarray
    y: np.ndarray
    se: np.ndarray | None

    @classmethod
    def of(cls, study: optuna.Study, space: SearchSpace) -> ModelData:
        enc = UnitEncoding(space)
        completed = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and in_space(t, enc.keys)
        ]
        measured = [t for t in completed if t.user_attrs.get(FIDELITY_ATTR) not in NOT_MEASURED]
        predicted = [
            t
            for t in completed
            if t.user_attrs.get(FIDELITY_ATTR) in NOT_MEASURED and t.user_attrs.get(PREDICTION_SE_ATTR) is not None
        ]
        # predictions join the model only as noisy observations, and only when the measured points have a noise too
        with_se = all(t.user_attrs.get(METRIC_SE_ATTR) is not None for t in measured)
        done = measured + predicted if with_se else measured
        x = np.array([enc.encode(t.params) for t in done]).reshape(len(done), enc.d)
        y = np.array([_violation(t) for t in done])
        se_raw = [t.user_attrs.get(PREDICTION_SE_ATTR, t.user_attrs.get(METRIC_SE_ATTR)) for t in done]
        known = [float(s) for s in se_raw if s is not None]
        se = np.array(known) if len(known) == len(se_raw) else None
        return cls(measured, done, x, y, se)

    def posterior(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The constraint GP's posterior mean and standard deviation at ``done`` (None if it cannot be fitted)."""
        return constraint_posterior(self.x, self.y, self.se)


def constraint_posterior(x: np.ndarray, y: np.ndarray, se: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Posterior mean and standard deviation of the constraint GP at the observed points (``n x d``
    unit-cube inputs, ``n`` constraint values, optional standard errors); None if the model cannot
    be fitted."""
    from .gp import clip_violation, fit_gp, posterior

    y = clip_violation(y, se)
    try:
        model = fit_gp(x, y, se)
        mean, sd = posterior(model, x)
    except Exception:  # a degenerate data set (e.g. all values equal): keep the observed answer
        return None
    return (mean, sd) if np.isfinite(mean).all() and np.isfinite(sd).all() else None


def pick_note(pick: Pick, records: Sequence) -> str | None:
    """A sentence for ``Result.notes`` when the pick passed over the best observed trial."""
    if pick.number is None or pick.number == pick.observed or pick.observed_mean is None:
        return None
    return (
        f"Trial {pick.observed} met the constraints with the smallest objective, but the model of all "
        f"{len(records)} trials expects its constraint value at {pick.observed_mean:+.4f} (> 0: likely a lucky "
        f"measurement); trial {pick.number} is returned instead (expected {pick.mean:+.4f})."
    )
