"""The search loop on an Optuna study: ask -> plan -> evaluate -> tell, with a budget counted over
restarts, failures recorded, and interrupted trials retried."""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from ..operators.plan import Plan
from ..records import Measurement, TrialRecord
from .context import SearchContext
from .samplers import make_sampler
from .space import SearchSpace

log = logging.getLogger("tightfit")

INTERRUPTED = "interrupted"


@dataclass
class TrialOutcome:
    """What evaluating one plan produced: the objective to minimize, the constraint values
    (<= 0 feasible) and JSON-ready attributes to store on the trial."""

    objective: float | list[float]  # one value, or one per study direction
    constraints: list[float]
    attrs: dict[str, Any] = field(default_factory=dict)


EvaluatePlan = Callable[[Plan, optuna.Trial], TrialOutcome]


def derive_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def trial_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """The constraint values of a trial in the order the loop set them (<= 0 is feasible)."""
    return [trial.constraints[k] for k in sorted(trial.constraints, key=int)]


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use up budget: completed ones, and failures of the evaluation itself (not
    interruptions, which are retried)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED))
    ]


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a dead process as interrupted failures and enqueue their
    parameters again. Only safe when no other process works on the study (the run-dir lock)."""
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # FrozenTrial exposes no public id; Trial(study, id) is Optuna's own handle for a live trial.
        handle = optuna.trial.Trial(study, t._trial_id)
        handle.set_user_attr(INTERRUPTED, True)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        recovered += 1
    return recovered


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    evaluate_plan: EvaluatePlan,
    *,
    budget: int,
    method: str,
    seed: int,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    context: SearchContext | None = None,
) -> None:
    """Evaluate trials until ``budget`` of them count. Ctrl-C loses only the running trial: it is
    marked interrupted, its parameters are enqueued again, and the KeyboardInterrupt propagates.
    ``context`` (optional) gives samplers more than the space: probes, the model's weights; the
    optimizer's own time per suggestion is stored on each trial as ``search_time_s``."""
    while True:
        done = len(counted_trials(study))
        if done >= budget:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            asked = time.perf_counter()
            study.sampler = make_sampler(method, derive_seed(seed, done), space, budget, context)
            trial = study.ask()
            plan = None
            try:
                plan = space.suggest(trial)  # relative samplers suggest inside ask; the rest here
            except Exception:
                pass
            trial.set_user_attr("search_time_s", time.perf_counter() - asked)
        started = time.perf_counter()
        try:
            if plan is None:
                plan = space.suggest(trial)
            outcome = evaluate_plan(plan, trial)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            raise
        except Exception as exc:  # a failing trial is recorded and the search goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            trial.set_user_attr("traceback", traceback.format_exc(limit=8))
            trial.set_user_attr("duration_s", time.perf_counter() - started)
            frozen = study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
        else:
            for key, value in outcome.attrs.items():
                trial.set_user_attr(key, value)
            for index, value in enumerate(outcome.constraints):
                trial.set_constraint(str(index), float(value))
            trial.set_user_attr("duration_s", time.perf_counter() - started)
            values = outcome.objective
            values = [float(v) for v in values] if isinstance(values, (list, tuple)) else float(values)
            frozen = study.tell(trial, values)
        if on_trial is not None:
            on_trial(frozen)


def trial_record(t: optuna.trial.FrozenTrial) -> TrialRecord:
    """The plain record of a stored trial."""
    attrs = t.user_attrs
    return TrialRecord(
        number=t.number,
        state=t.state.name,
        plan=Plan.from_dict(attrs["plan"]) if "plan" in attrs else None,
        measurement=Measurement.from_dict(attrs["measurement"]) if "measurement" in attrs else None,
        objective=t.values[0] if t.state == TrialState.COMPLETE and t.values else None,
        constraints=tuple(trial_constraints(t)),
        error=attrs.get("error") or ("interrupted" if attrs.get(INTERRUPTED) else None),
        duration_s=attrs.get("duration_s"),
        search_time_s=attrs.get("search_time_s"),
    )
