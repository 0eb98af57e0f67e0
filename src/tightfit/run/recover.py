"""One recovery after the search (``compress(..., recover=FineTune(...), recover_top=k)``): the best
``k`` feasible plans of the search are each fine-tuned once, with the compression held and the run's
seed (as a trial's fine-tune), re-measured and re-checked; the answer is the best of them after
recovery. The search itself can then run without training (``finetune=None``): the workflow for
models whose fine-tuning takes hours. Such a search can be held to a looser ``search_constraint``
than the answer's: the recovery is what closes the gap, each recovered plan re-checked against
``constraint``; if none meets it, the answer is the best plan that met ``constraint`` untrained.
Under ``evaluation=Sequential(...)`` the recovered (and fallback) plans are measured on the full
validation set, the certificate's held-out samples included: a plan reported feasible meets
``constraint`` on the validation set, and the certificate, whose samples took part in that check,
may be optimistic (the result says so)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..evaluation.constraints import Constraint
from ..evaluation.metrics import evaluate_metric
from ..measure.latency import Latency
from ..operators.compose import Compose
from ..records import NOT_ANSWERS, Measurement, TrialRecord, best_feasible, better
from .evaluator import apply_to_copy, recover_seeded
from .measuring import StaticMeasure, timed


@dataclass
class Recovered:
    """What the recovery after the search did: each recovered trial's metric before and after, and
    whether it still met the constraints; the chosen one's record (its measurement after recovery)
    and file."""

    before: dict[int, float] = field(default_factory=dict)  #: trial -> metric in the search
    after: dict[int, float] = field(default_factory=dict)  #: trial -> metric after recovery
    feasible: dict[int, bool] = field(default_factory=dict)  #: trial -> constraints met after recovery
    seconds: float = 0.0
    chosen: TrialRecord | None = None
    data: bytes | None = None
    #: with ``search_constraint``: the best plan that met ``constraint`` in the search (untrained),
    #: the answer when no recovered plan meets it
    fallback: TrialRecord | None = None
    #: the search was held to other (looser) constraints than the answer
    loosened: bool = False

    @property
    def answer(self) -> TrialRecord | None:
        """The plan the recovery made the answer (recovered, or the re-checked fallback), measured on
        the full validation set already; None when the run's own pick stands."""
        return self.chosen if self.chosen is not None else self.fallback

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [
                {
                    "trial": n,
                    "metric_before": self.before[n],
                    "metric_after": self.after[n],
                    "feasible": self.feasible[n],
                }
                for n in self.before
            ],
            "chosen": self.chosen.number if self.chosen is not None else None,
            "unrecovered_answer": self.fallback.number if self.fallback is not None else None,
            "seconds": self.seconds,
        }


@dataclass
class AfterSearch:
    """How the recovered plans are rebuilt and measured: as the run's trials were."""

    original: nn.Module
    strategy: Compose
    calibration: list[Any] | None
    recover: Callable[[nn.Module], None]
    seed: int
    evaluate: Any
    static: StaticMeasure
    constraints: list[Constraint]
    baseline: Measurement
    objective: str
    latency: Latency | None = None

    def top(self, trials: Sequence[TrialRecord], k: int, first: TrialRecord) -> list[TrialRecord]:
        """The run's chosen trial ``first``, then the next best feasible, fully evaluated trials up
        to ``k`` (one per distinct plan)."""
        ranked: list[TrialRecord] = [first]
        pool = [
            t
            for t in trials
            if t.feasible
            and t.measurement is not None
            and t.fidelity not in NOT_ANSWERS
            and t.plan is not None
            and plan_key(t) != plan_key(first)
        ]
        while pool and len(ranked) < k:
            best = pool[0]
            for t in pool[1:]:
                if better(t, best):
                    best = t
            ranked.append(best)
            pool = [t for t in pool if t is not best and plan_key(t) != plan_key(best)]
        return ranked

    def one(self, trial: TrialRecord, train: bool = True) -> tuple[TrialRecord, bytes]:
        assert trial.plan is not None  # top() takes measured trials only
        candidate = apply_to_copy(trial.plan, self.original, self.strategy, self.calibration)
        if train:
            recover_seeded(self.recover, candidate, self.seed)
        metric = evaluate_metric(self.evaluate, candidate)
        data, static = self.static(candidate, trial.plan, trial.number)
        latency = timed(self.latency, candidate)
        measured = dataclasses.replace(
            static, metric=metric, latency_ms=latency["latency_ms"], latency_iqr_ms=latency["latency_iqr_ms"]
        )
        values = tuple(c.value(measured, self.baseline) for c in self.constraints)
        record = dataclasses.replace(
            trial, measurement=measured, objective=measured.objective(self.objective), constraints=values
        )
        return record, data

    def run(self, trials: Sequence[TrialRecord], k: int, first: TrialRecord) -> Recovered:
        started, out = time.perf_counter(), Recovered()
        for trial in self.top(trials, k, first):
            record, data = self.one(trial)
            assert trial.measurement is not None and record.measurement is not None
            out.before[trial.number] = trial.measurement.metric
            out.after[trial.number] = record.measurement.metric
            out.feasible[trial.number] = record.feasible
            if record.feasible and better(record, out.chosen):
                out.chosen, out.data = record, data
        out.seconds = time.perf_counter() - started
        return out

    def fallback(self, trials: Sequence[TrialRecord], k: int, recheck: bool) -> TrialRecord | None:
        """With ``search_constraint``, when no recovered plan meets ``constraint``: the best plan
        that met it in the search, untrained. Under cheap evaluation (``recheck``) a trial's metric
        is an estimate the sequential test may have stopped early, deciding only the looser
        constraint; so the best ``k`` such plans are measured again (``evaluate``: the whole search
        set) and the first that still meets ``constraint`` is the answer. Screened plans count too:
        the search screens every plan larger than its best, which is where the plans that meet the
        tighter constraint untrained are (digits: the only one of 8 was screened)."""
        rescored = self.rescored(trials)
        if not recheck:
            return best_feasible(rescored)
        # a capped plan's values are estimates too: measured again like a screened one
        again = ("screen", "capped")
        pool = [dataclasses.replace(t, fidelity="full", state="COMPLETE") for t in rescored if t.fidelity in again]
        pool += [t for t in rescored if t.fidelity not in NOT_ANSWERS]
        for _ in range(k):
            best = best_feasible(pool)
            if best is None:
                return None
            record, _data = self.one(best, train=False)
            if record.feasible:
                return record
            pool = [t for t in pool if t is not best]
        return None

    def rescored(self, trials: Sequence[TrialRecord]) -> list[TrialRecord]:
        """The trials as this object's constraints judge their measurements (those of the search
        were looser)."""
        return [
            dataclasses.replace(t, constraints=tuple(c.value(t.measurement, self.baseline) for c in self.constraints))
            if t.measurement is not None
            else t
            for t in trials
        ]


def plan_key(trial: TrialRecord) -> Any:
    return trial.plan.to_dict() if trial.plan is not None else None


def recovery_note(recovered: Recovered, k: int) -> str:
    if not recovered.before:
        return "Recovery after the search: no feasible plan to recover."
    parts = ", ".join(
        f"trial {n} {recovered.before[n]:.4f} -> {recovered.after[n]:.4f}"
        + ("" if recovered.feasible[n] else " (breaks the constraints)")
        for n in recovered.before
    )
    head = f"Recovery after the search ({len(recovered.before)} of the best {k} plans, {recovered.seconds:.1f} s): "
    if recovered.chosen is not None:
        return head + parts + f"; trial {recovered.chosen.number} is the answer."
    if not recovered.loosened:
        return head + parts + "; none met the constraints after recovery, so the searched answer is kept unrecovered."
    if recovered.fallback is not None:
        return (
            head
            + parts
            + f"; none met `constraint` after recovery, so the answer is trial {recovered.fallback.number}, "
            "the best plan that met it in the search without training. Raise `recover_top`, train longer, or "
            "tighten `search_constraint`."
        )
    return (
        head + parts + "; none met `constraint` after recovery and no plan met it without training, so nothing is "
        "feasible. Raise `recover_top`, train longer, or tighten `search_constraint`."
    )
