"""The search loop on an Optuna study: ask -> plan -> evaluate -> tell, with a budget counted over
restarts, failures recorded, and interrupted trials retried."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import EvaluationError
from ..operators.plan import Plan
from ..optuna_compat import cached_trials, live_trial, study_storage
from ..records import TrialAttrs, TrialRecord
from ..run_dir import ERROR_ATTR, INTERRUPTED_ATTR
from ..scale.storage import (
    RETRY_OF,
    duplicate_retries,
    fail_stale_trials,
    heartbeat_enabled,
    lost_trials,
    plan_drawn,
    requeue_lost_trials,
    trial_heartbeat,
)
from .context import EXHAUSTED, SearchContext
from .samplers import make_sampler
from .space import SearchSpace

log = logging.getLogger("tightfit")

INTERRUPTED = INTERRUPTED_ATTR
_STALE_CHECK_S = 1.0
#: A run whose first trials (in this process) all fail with this many identical errors stops: a
#: missing package or a broken evaluation fails every trial alike, and finishing the budget would
#: only return the original model (30 trials of `ModuleNotFoundError: cma` did, before the check).
SAME_FAILURE_STOP = 3


class FirstFailures:
    """Stops a run whose first :data:`SAME_FAILURE_STOP` trials failed with one and the same error."""

    def __init__(self, limit: int = SAME_FAILURE_STOP) -> None:
        self.limit = limit
        self.errors: list[str] | None = []  # None once a trial succeeded: failures later are the search's own

    def succeeded(self) -> None:
        self.errors = None

    def failed(self, error: str) -> None:
        if self.errors is None:
            return
        self.errors.append(error)
        if len(self.errors) >= self.limit and len(set(self.errors)) == 1:
            raise EvaluationError(
                f"The first {len(self.errors)} trials all failed with the same error, so the search stopped instead "
                f"of spending its budget on it: {error}. Each trial's traceback is stored with it (trials.csv, "
                "the study); fix the cause and run again."
            )


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TrialOutcome:
    """What evaluating one plan produced: the objective to minimize, the constraint values
    (<= 0 feasible) and the attributes to store on the trial (a :class:`~tightfit.records.TrialAttrs`,
    or a plain JSON-ready dict from a caller with attributes of its own). ``pruned``: the plan was only
    screened at a low fidelity (cheap evaluation); it is told to Optuna as PRUNED with the objective
    as its intermediate value, so samplers treat it as "not worth a full evaluation"."""

    objective: float | list[float]  # one value, or one per study direction
    constraints: list[float]
    attrs: TrialAttrs | dict[str, Any] = field(default_factory=dict)
    pruned: bool = False


EvaluatePlan = Callable[[Plan, optuna.Trial], TrialOutcome]


def derive_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def trial_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """The constraint values of a trial in the order the loop set them (<= 0 is feasible)."""
    return [trial.constraints[k] for k in sorted(trial.constraints, key=int)]


def _counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
    return [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)  # PRUNED: screened by cheap evaluation
        or (
            t.state == TrialState.FAIL
            and ERROR_ATTR in t.user_attrs
            and not t.user_attrs.get(INTERRUPTED)
            and t.number not in retried
        )
    ]


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use up budget: completed ones, screened ones (PRUNED, cheap evaluation), and
    failures of the evaluation itself. Not counted: interrupted trials and trials whose worker died (no heartbeat); both are retried."""
    return _counted(study.get_trials(deepcopy=False))


def trial_position(trials: list[optuna.trial.FrozenTrial], number: int) -> int:
    """The position of trial ``number`` in the search: how many distinct trials (a retry is the same
    trial as the one it replaces) were started before it; a retry takes its original's position.

    In one process this is the number of counted trials when the trial starts, whatever
    interruptions came before, so a resumed run seeds its samplers like an uninterrupted one.
    Concurrent workers get distinct positions, also when a trial of a dead worker is retried, so
    they do not draw the same point."""
    by_number = {t.number: t for t in trials}

    def root(n: int) -> int:
        seen = set()
        while n in by_number and RETRY_OF in by_number[n].user_attrs and n not in seen:
            seen.add(n)
            n = by_number[n].user_attrs[RETRY_OF]
        return n

    first = root(number)
    return len({root(t.number) for t in trials if t.number < first} - {first})


class PositionSeededSampler(optuna.samplers.BaseSampler):
    """A fresh sampler for each trial, seeded from the run's seed and the trial's position
    (:func:`trial_position`): resume == uninterrupted, and workers do not repeat each other."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner = make(derive_seed(seed, 0))

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # the trials Optuna's samplers read in the same ask: one storage query serves both
        position = trial_position(cached_trials(study), trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._inner = self._make(derive_seed(self._seed, position))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def retry_params(trial: optuna.trial.FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """The parameters a retry of an interrupted trial is queued with: all of them once the plan was
    drawn (:func:`~tightfit.scale.storage.plan_drawn`), none otherwise (the retry takes its
    original's position, :func:`trial_position`, so it draws the same plan)."""
    return dict(trial.params) if plan_drawn(trial) else {}


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a dead process as interrupted failures and enqueue their
    parameters again. Only safe when no other process works on the study (the run-dir lock);
    shared storages rely on heartbeats instead (:mod:`tightfit.scale`)."""
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        handle = live_trial(study, t)
        _write(handle, TrialAttrs(interrupted=True))
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(retry_params(t), user_attrs=TrialAttrs(retry_of=t.number).to_user_attrs())
        recovered += 1
    # failed trials whose retry the dead process did not get to queue (nobody else works on the study)
    return recovered + requeue_lost_trials(study, settle_s=0.0)


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    evaluate_plan: EvaluatePlan,
    *,
    budget: int,
    method: str,
    seed: int,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    drain: bool = False,
    poll_s: float = 0.5,
    context: SearchContext | None = None,
) -> int:
    """Evaluate trials until ``budget`` of them count; returns how many this process evaluated.

    Several processes may run this on one study (a shared storage with heartbeats): a process asks
    for a trial only while counted + running trials < budget, so the budget is overshot only by
    workers that pass that check at the same moment (at most workers - 1 trials). ``drain`` waits
    for other workers' running trials before returning (the process that reports the result).
    Ctrl-C (or SIGTERM in a worker) loses only the running trial: it is marked interrupted, its
    parameters are enqueued again, and the KeyboardInterrupt propagates.

    ``context`` (optional) gives samplers more than the space (probes, the model's weights); the
    optimizer's own time per suggestion is stored on each trial as ``search_time_s``."""
    study.sampler = PositionSeededSampler(lambda s: make_sampler(method, s, space, budget, context), seed)
    evaluated = 0
    first_failures = FirstFailures()
    stale_checked = float("-inf")
    while True:
        if time.monotonic() - stale_checked >= _STALE_CHECK_S:  # a query; staleness takes seconds anyway
            fail_stale_trials(study)
            stale_checked = time.monotonic()
        trials = study.get_trials(deepcopy=False)
        done = len(_counted(trials))
        running = sum(t.state == TrialState.RUNNING for t in trials)
        exhausted = context is not None and bool(context.memo.get(EXHAUSTED))  # every plan measured
        if (done >= budget or exhausted) and (running == 0 or not drain or not heartbeat_enabled(study_storage(study))):
            return evaluated
        if done + running >= budget or exhausted or _places_held(study, trials, budget - done - running):
            time.sleep(poll_s)  # the last trials are running elsewhere; wait for them or their retries
            continue
        trial, asked = _ask(study)
        if _drop_duplicate_retry(study, trial):
            continue
        evaluated += 1
        started = time.perf_counter()
        error: TrialAttrs | None
        try:
            with trial_heartbeat(study, trial):
                _write(trial, TrialAttrs(worker=_worker_id()))  # which process ran it: for reports
                suggest_started = time.perf_counter()
                plan = space.suggest(trial)  # relative samplers do their work here, on first suggest
                _write(trial, TrialAttrs(search_time_s=(started - asked) + (time.perf_counter() - suggest_started)))
                outcome = evaluate_plan(plan, trial)
        except KeyboardInterrupt:
            _requeue(study, trial)
            raise
        except Exception as exc:  # a failing trial is recorded and the search goes on
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            error = TrialAttrs(
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(limit=8),
                duration_s=time.perf_counter() - started,
            )
            frozen = _record(study, trial, error.to_user_attrs(), [], None)
        else:
            error = None
            frozen = _record_outcome(study, trial, outcome, started)
        if on_trial is not None and frozen is not None:
            on_trial(frozen)
        if error is None:
            first_failures.succeeded()
        else:
            first_failures.failed(error.error or "")


def _places_held(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], free: int) -> bool:
    """Whether the budget's ``free`` places are held by failed trials whose retry is not queued yet
    (:func:`~tightfit.scale.storage.lost_trials`: a worker declared one stale a moment ago, or died
    before it queued the retry). A fresh trial must not take a lost plan's place: the stale check
    queues the retry within the grace period, and a queued trial is always asked for."""
    if not heartbeat_enabled(study_storage(study)) or any(t.state == TrialState.WAITING for t in trials):
        return False
    return len(lost_trials(study, trials)) >= free


def _ask(study: optuna.Study) -> tuple[optuna.Trial, float]:
    """A new trial, and when it was asked for (the sampler's time counts from there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        asked = time.perf_counter()
        return study.ask(), asked


def _drop_duplicate_retry(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether ``trial`` is a second retry of one trial (two workers requeued a lost trial at once,
    :func:`~tightfit.scale.storage.requeue_lost_trials`); if so it is failed unevaluated, so no plan
    is evaluated twice. The first retry, by number, is the one evaluated."""
    if trial.user_attrs.get(RETRY_OF) is None:
        return False  # a trial of its own (every retry tightfit queues names its original): no query
    if trial.number not in duplicate_retries(study.get_trials(deepcopy=False)):
        return False
    log.warning("trial %d repeats an earlier retry of trial %s; dropped", trial.number, trial.user_attrs[RETRY_OF])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        study.tell(trial, state=TrialState.FAIL)
    return True


def _requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted trial: marked so, failed, and its parameters enqueued again (:func:`retry_params`)."""
    _write(trial, TrialAttrs(interrupted=True))
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(retry_params(trial), user_attrs=TrialAttrs(retry_of=trial.number).to_user_attrs())


def _record_outcome(
    study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, started: float
) -> optuna.trial.FrozenTrial | None:
    """Store an evaluated trial: its attributes and duration, constraints and objective value(s)."""
    attrs = {
        **_user_attrs(outcome.attrs),
        **TrialAttrs(duration_s=time.perf_counter() - started).to_user_attrs(),
    }
    values = outcome.objective
    values = [float(v) for v in values] if isinstance(values, (list, tuple)) else float(values)
    return _record(study, trial, attrs, outcome.constraints, values, pruned=outcome.pruned)


def _user_attrs(attrs: TrialAttrs | dict[str, Any]) -> dict[str, Any]:
    return attrs.to_user_attrs() if isinstance(attrs, TrialAttrs) else dict(attrs)


def _write(trial: optuna.Trial, attrs: TrialAttrs) -> None:
    for key, value in attrs.to_user_attrs().items():
        trial.set_user_attr(key, value)


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    attrs: dict[str, Any],
    constraints: Sequence[float],
    objective: float | list[float] | None,
    pruned: bool = False,
) -> optuna.trial.FrozenTrial | None:
    """Store a finished trial; None if another worker already declared it stale (this process was
    silent for longer than the grace period), in which case its retry stands in for it."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if pruned:  # screened at a low fidelity: the objective as its only intermediate value
            if not isinstance(objective, float):  # what float() would refuse, said plainly
                raise TypeError(f"a screened (pruned) trial has one objective value, not {objective!r}")
            trial.report(objective, step=0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                return study.tell(trial, state=TrialState.PRUNED)
        for index, value in enumerate(constraints):
            trial.set_constraint(str(index), float(value))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            if objective is None:
                return study.tell(trial, state=TrialState.FAIL)
            return study.tell(trial, objective)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(
            "trial %d was declared stale by another worker (no heartbeat within the grace period); "
            "its result is dropped and its retry is evaluated instead",
            trial.number,
        )
        return None


def trial_record(t: optuna.trial.FrozenTrial) -> TrialRecord:
    """The plain record of a stored trial."""
    attrs = TrialAttrs.from_trial(t)
    return TrialRecord(
        number=t.number,
        state=t.state.name,
        plan=attrs.plan,
        measurement=attrs.measurement,
        objective=(
            t.values[0]
            if t.state == TrialState.COMPLETE and t.values
            else t.intermediate_values.get(0)
            if t.state == TrialState.PRUNED
            else None
        ),
        constraints=tuple(trial_constraints(t)),
        error=attrs.error or ("interrupted" if attrs.interrupted else None),
        duration_s=attrs.duration_s,
        val_samples=attrs.val_samples,
        finetune_steps=attrs.finetune_steps,
        metric_se=attrs.metric_se,
        fidelity=attrs.fidelity,
        search_time_s=attrs.search_time_s,
        probe_samples=attrs.probe_samples,
        probe_s=attrs.probe_s,
        finetune_s=attrs.finetune_s,
    )
