"""How ``compress`` evaluates one plan under ``evaluation=Sequential(...)``: fidelity levels, the
sequential test, and the per-trial accounting the search and the reports read.

Levels: a candidate that could improve the current answer (objective at least
``Sequential.min_improvement`` below the incumbent the sampler says it works from, or else below
the best feasible trial so far; size constraints met) is *promoted*: fine-tuned in full, then
evaluated sequentially until its constraints are decided. Any other candidate is *screened*: no
fine-tune, first look only. It can never be the answer, and it costs a few dozen forward passes
instead of a fine-tune and a full evaluation. Until the stages below are calibrated it is told
to Optuna as PRUNED (its objective as the intermediate value, no constraint values), which TPE
ranks after the completed feasible trials. Once they are, it is told as a completed trial whose
constraint values are predicted: its untuned estimate minus the mean gain the whole fine-tune gave
the calibration curves. Model-based
samplers (``bo``, the level-set warm start) read only completed trials; told as PRUNED, a
screened plan stayed invisible to them and they kept proposing similar plans (measured: 22 of 30
trials screened on digits, see docs/benchmarks.md).

Stages (``Sequential.stages``, see ``tightfit.evaluation.stages``): a promoted candidate's
fine-tune is checked at fractions of its steps on the stage samples and *stopped* when it surely
cannot meet a constraint after the remaining steps (told the optimistic prediction of its final
values, still > 0), or when it is less likely than ``Sequential.promote_probability`` to meet them
(successive promotion; told its central prediction). Either way it is told to the search as a
completed, infeasible trial (fidelity ``"stopped"``, the reason in ``stop_reason``), so a model of
the constraint learns that the region fails. Candidates fine-tuned in full store their curve
(values at each stage and at the end on the same samples), which calibrates both rules for later
candidates. Optuna's pruner interface is not used: its intermediate values are read by samplers as
*objective* values, while these are constraint values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..evaluation.sequential import FEASIBLE, SequentialSession
from ..evaluation.stages import (
    Curve,
    EarlyStop,
    curves_of,
    feasible_probability,
    hopeless,
    planned_steps,
    stage_steps,
    staged,
    tuned_prediction,
    tuned_prediction_spread,
)
from ..operators.plan import Plan
from ..optuna_compat import trial_system_attrs
from ..records import UNSET, Measurement, TrialAttrs, TrialRecord
from ..run_dir import INCUMBENT_ATTR
from ..search.loop import TrialOutcome
from ..search.pick import Capped
from .evaluator import TrialSetup, recover_seeded


@dataclass
class _Trial:
    """One candidate's state while it is evaluated: its static measurement, level, fine-tune
    stages and what each look cost."""

    plan: Plan
    trial: Any
    candidate: nn.Module
    data: bytes
    measured: Measurement
    goal: float
    level: str
    started: float
    finetune: Any = None
    tuned: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    total: int | None = None
    staging: bool = False
    curves: list = field(default_factory=list)
    at_steps: list[int] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # the trial's cost, stage by stage
    passed: list[torch.Tensor] = field(default_factory=list)  # constraint statistics at each stage passed
    untuned: torch.Tensor | None = None  # constraint statistics on the stage samples before fine-tuning
    stop: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


class SequentialEvaluator:
    """Cheap evaluation (module docstring): screens, staged fine-tunes, the sequential test."""

    def __init__(self, setup: TrialSetup, session: SequentialSession) -> None:
        self.setup = setup
        self.session = session

    def __call__(self, plan: Plan, trial: Any) -> TrialOutcome:
        s, session = self.setup, self.session
        s.counter.take()
        started = time.perf_counter()
        candidate = s.candidate(plan)
        data, measured = s.static(candidate, plan, trial.number)
        goal = s.goal(measured)
        fixed_ok = all(s.constraints[i].value(measured, s.baseline) <= 0 for i in session.fixed)
        reference = incumbent_objective(s.best.record, trial)
        promising = fixed_ok and (reference is None or goal < reference * (1 - session.config.min_improvement))
        level = "full" if (promising or not session.config.screen) else "screen"
        t = _Trial(plan, trial, candidate, data, measured, goal, level, started)
        t.finetune, t.tuned = s.recovery_for(trial)
        t.steps = 0 if t.finetune is not None else None
        t.total = planned_steps(t.finetune) if t.finetune is not None else None
        t.staging = bool(t.total and session.stages_calibratable and session.config.stages)
        t.curves = curves_of(trial.study.get_trials(deepcopy=False), t.total) if t.staging else []
        if level == "full" and t.finetune is not None:
            self._fine_tune(t)
            if t.stop:
                return self._stopped(t)
        return self._evaluated(t)

    def _fine_tune(self, t: _Trial) -> None:
        """The promoted candidate's fine-tune, checked at its stages (``t.stop`` set when stopped)."""
        session = self.session
        t.at_steps = stage_steps(t.total, session.config.stages) if t.staging else []
        # the untuned look (what a screen would have seen) costs passes: only the first max_curves
        # curves start with one; every curve has its stages and end (free: the stage looks are
        # taken anyway and the end is read by the sequential test)
        record_curve = bool(t.at_steps) and sum(c.untuned is not None for c in t.curves) < session.config.max_curves
        if record_curve:
            looked = time.perf_counter()
            t.untuned = session.stage_statistics(session.stage_values(t.candidate))
            t.evaluations.append(
                {"level": "untuned", "val_samples": len(t.untuned), "seconds": time.perf_counter() - looked}
            )
        t.last = {"t": time.perf_counter(), "steps": 0}
        with contextlib.suppress(EarlyStop):  # a stage rule stopped the candidate: t.stop says why
            recover_seeded(
                t.finetune,
                t.candidate,
                self.setup.seed,
                around=staged(t.candidate, t.at_steps, lambda stage, taken: self._check(t, stage, taken)),
            )
        if t.stop:
            t.steps = t.stop["steps"]
            return
        t.steps = getattr(t.finetune, "steps_taken", None)
        # weights changed (the compressed file with them), masks did not: nonzeros and FLOPs stay
        t.data, t.measured = self.setup.static(t.candidate, t.plan, t.trial.number, t.measured)
        t.goal = self.setup.goal(t.measured)
        if t.at_steps:
            t.evaluations.append(
                {
                    "level": "finetune",
                    "finetune_steps": (t.steps or 0) - t.last["steps"],
                    "seconds": time.perf_counter() - t.last["t"],
                }
            )

    def _check(self, t: _Trial, stage: int, taken: int) -> bool:
        """The look at ``stage`` (``taken`` steps): True stops the fine-tune."""
        session = self.session
        values = session.stage_values(t.candidate)
        stats = session.stage_statistics(values)
        estimates = session.stage_estimates(stats)
        means, ses = [e.mean for e in estimates], [e.se for e in estimates]
        hopeless_now, predicted = hopeless(
            means,
            ses,
            t.curves,
            stage,
            z=session.stage_z,
            slack=session.config.stop_slack,
            min_curves=session.config.min_curves,
        )
        reason = "hopeless" if hopeless_now else None
        promotion = feasible_probability(means, ses, t.curves, stage, min_curves=session.config.min_curves)
        if not hopeless_now and promotion is not None and promotion.probability < session.config.promote_probability:
            hopeless_now, reason, predicted = True, "unpromising", told_infeasible(promotion.predicted)
        now = time.perf_counter()
        t.evaluations.append(
            {
                "level": "stage",
                "stage": stage,
                "fraction": taken / t.total,
                "finetune_steps": taken - t.last["steps"],
                "val_samples": len(values),
                "values": means,
                "se": ses,
                "seconds": now - t.last["t"],
                "stop": hopeless_now,
                "stop_reason": reason,
                "p_feasible": promotion.probability if promotion is not None else None,
            }
        )
        t.last.update(t=now, steps=taken)
        t.passed.append(stats)
        if hopeless_now:
            # the prediction's uncertainty, which the final pick reads: its spread when it is central
            sd = max(promotion.sd) if reason == "unpromising" else max(ses)
            t.stop.update(
                predicted=predicted,
                estimates=estimates,
                metric=session.paired_metric(values),
                steps=taken,
                reason=reason,
                sd=sd,
                look_se=max(ses),
            )
        return hopeless_now

    def _screen_prediction(self, t: _Trial, ev: Any, values: list[float]) -> tuple[list[float], Any, float | None]:
        """A screened candidate, once the stages are calibrated: told as a completed trial with the
        values fine-tuning would likely give it (calibrated on the curves), so that model-based
        samplers, which ignore PRUNED trials, learn its objective and stop proposing it; its
        fidelity keeps it from ever being the answer. Returns (values, prediction, its spread)."""
        session = self.session
        calibrated = sum(c.untuned is not None for c in t.curves) >= session.config.min_curves
        if not (t.level == "screen" and t.staging and calibrated):
            return values, None, None
        # the screen's own look (an unbiased estimate of the untuned value, like the curves' one)
        predicted = tuned_prediction(
            [float(v) for v in session.stage_statistics(ev.values).mean(0)],
            t.curves,
            min_curves=session.config.min_curves,
        )
        if predicted is None:
            return values, None, None
        predicted_of = dict(zip(session.linear, predicted))
        values = [predicted_of.get(i, v) for i, v in enumerate(values)]
        spread = tuned_prediction_spread(t.curves)
        prediction_se = None
        if spread:  # the told values' uncertainty: the look's and the whole fine-tune's gain spread
            prediction_se = (ev.metric_se**2 + max(spread) ** 2) ** 0.5
        return values, predicted, prediction_se

    def _curve(self, t: _Trial, ev: Any) -> tuple[Curve | None, int]:
        """The candidate's calibration curve for later candidates, and the samples read besides the
        sequential test's (stage samples)."""
        if not (t.at_steps and len(t.passed) == len(t.at_steps)):
            return None, 0
        session = self.session
        final = session.stage_statistics(session.stage_values(t.candidate, ev.values))  # same samples, fully tuned
        curve = Curve(
            total_steps=t.total,
            samples=len(final),
            stages=tuple(tuple(float(v) for v in stats.mean(0)) for stats in t.passed),
            final=tuple(float(v) for v in final.mean(0)),
            gain_se=tuple(session.gain_se(stats, final) for stats in t.passed),
            untuned=tuple(float(v) for v in t.untuned.mean(0)) if t.untuned is not None else None,
        )
        return curve, max(0, len(final) - ev.samples)

    def _evaluated(self, t: _Trial) -> TrialOutcome:
        """The sequential test on the candidate (screened, or fine-tuned in full)."""
        s, session = self.setup, self.session
        eval_started = time.perf_counter()
        ev = session.evaluate(t.candidate, level=t.level)
        m = t.measured
        measured = Measurement(ev.metric, m.size_bytes, m.nonzeros, m.weight_params, m.flops)
        values = [
            ev.constraint_values[i] if i in ev.constraint_values else c.value(measured, s.baseline)
            for i, c in enumerate(s.constraints)
        ]
        values, predicted, prediction_se = self._screen_prediction(t, ev, values)
        curve, extra = self._curve(t, ev)  # extra: samples read besides the sequential test's
        fidelity = "capped" if ev.capped else t.level
        if ev.capped:
            session.capped[t.trial.number] = ev.values
        record = TrialRecord(t.trial.number, "COMPLETE", t.plan, measured, t.goal, tuple(values), fidelity=fidelity)
        if t.level == "full":
            s.best.offer(record, t.data)
        passes = s.counter.take()
        t.evaluations.append(
            {
                "level": t.level,
                "val_samples": ev.samples + extra,
                "finetune_steps": 0 if t.at_steps else t.steps,
                "seconds": time.perf_counter() - eval_started,
            }
        )
        return TrialOutcome(
            objective=t.goal,
            constraints=values,
            pruned=t.level == "screen" and predicted is None,
            attrs=TrialAttrs(
                screen_constraints=values if t.level == "screen" else None,
                screen_prediction=list(predicted) if predicted is not None else None,
                plan=t.plan,
                measurement=measured,
                finetune_steps=t.steps,
                # the search's model reads a screen at the look's noise: it cannot improve the answer
                # anyway, and read at its prediction's wide spread it taught ``bo`` nothing (in a
                # digits run bo then proposed the same plan nine times in a row); the final pick
                # reads the spread
                metric_se=ev.metric_se,
                prediction_se=prediction_se if prediction_se is not None else UNSET,
                val_samples=passes if passes is not None else sum(e.get("val_samples", 0) for e in t.evaluations),
                fidelity=fidelity,
                stage_reached=1.0 if t.level == "full" else 0.0,
                sequential=_decision_attrs(ev.decision, session),
                evaluations=t.evaluations,
                curve=curve.to_dict() if curve is not None else UNSET,
                recovery=t.tuned or UNSET,
            ),
        )

    def _stopped(self, t: _Trial) -> TrialOutcome:
        """A candidate stopped at a stage: completed and infeasible, told with the optimistic
        predictions of its final constraint values (> 0 for the one that stopped it) and the stage
        estimate of its metric. Never the answer: fidelity "stopped", no file kept."""
        s, stop = self.setup, t.stop
        m = t.measured
        measured = Measurement(stop["metric"], m.size_bytes, m.nonzeros, m.weight_params, m.flops)
        predicted_of = dict(zip(self.session.linear, stop["predicted"]))
        values = [
            predicted_of[i] if i in predicted_of else c.value(measured, s.baseline) for i, c in enumerate(s.constraints)
        ]
        passes = s.counter.take()
        return TrialOutcome(
            objective=t.goal,
            constraints=values,
            attrs=TrialAttrs(
                plan=t.plan,
                measurement=measured,
                finetune_steps=stop["steps"],
                # the search's model reads the prediction at the stage look's own noise, as a screen's:
                # the prediction's spread overstates its error (replayed digits searches: errors of
                # 0.4-0.6 spreads, benchmarks/stage_predictors.py), and at that spread ``bo`` learned
                # little from a stop and proposed near-copies of the stopped plan (4 in a row on mnist1d
                # seed 1); the final pick reads the spread (PREDICTION_SE_ATTR)
                metric_se=stop["look_se"],
                prediction_se=stop["sd"],
                val_samples=passes if passes is not None else sum(e.get("val_samples", 0) for e in t.evaluations),
                fidelity="stopped",
                stop_reason=stop["reason"],
                stage_reached=t.evaluations[-1]["fraction"],
                evaluations=t.evaluations,
                recovery=t.tuned or UNSET,
            ),
        )


@dataclass
class Verified:
    """The verification after a search with capped candidates: each one read (trial, verdict,
    samples read, seconds) and the first accepted, re-measured on the whole search set, with its
    file."""

    chosen: TrialRecord | None = None
    data: bytes | None = None
    read: list[dict[str, Any]] = field(default_factory=list)


def verify_capped(
    setup: TrialSetup,
    session: SequentialSession,
    study: Any,
    trials: list[TrialRecord],
    candidates: list[Capped],
    best: TrialRecord | None,
) -> Verified:
    """Read capped trials to the end of the search set with the same sequential test, until one
    smaller than ``best`` (the best trial decided during the search) is accepted: at most
    ``verify_top`` of those the constraint model expects to be feasible, smallest first
    (``candidates``: every capped trial, smallest first, ``capped_candidates``).

    Without a decided answer, first every capped trial in the order the model is surest of, until
    one is accepted: a run whose every plan near the edge ended capped would otherwise end without
    an answer (fmnist-mobilenet at ``trial_samples=1024``: the three smallest credible ones failed;
    at 2048 the model expected none to be feasible, docs/evidence.md, "Capped trials")."""
    out = Verified()
    if best is None:
        for c in sorted(candidates, key=lambda c: (c.expected, c.objective)):
            if _read(setup, session, study, trials, c.number, out):
                break
    below = out.chosen.objective if out.chosen is not None else best.objective if best is not None else None
    read = {r["trial"] for r in out.read}
    smaller = [
        c for c in candidates if c.expected <= 0 and c.number not in read and (below is None or c.objective < below)
    ]
    for c in smaller[: session.config.verify_top]:
        if _read(setup, session, study, trials, c.number, out):
            break
    return out


def _read(
    setup: TrialSetup, session: SequentialSession, study: Any, trials: list[TrialRecord], number: int, out: Verified
) -> bool:
    """Verify capped trial ``number``: rebuilt from its plan (fine-tuned again with the run's seed
    and its own settings, as in its trial), read on the rest of the search set (the values it read
    in this process are not read again). True (and ``out.chosen`` set) when accepted."""
    started = time.perf_counter()
    record = next(t for t in trials if t.number == number)
    assert record.plan is not None and record.measurement is not None  # capped trials are measured
    candidate = setup.candidate(record.plan)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    recover, _tuned = setup.recovery_for(frozen)
    if recover is not None:
        recover_seeded(recover, candidate, setup.seed)
    ev = session.evaluate(candidate, level="verify", seen=session.capped.get(number))
    verdict = ev.decision.verdict
    out.read.append(
        {
            "trial": number,
            "verdict": verdict,
            "futile": ev.decision.futile,
            "val_samples": ev.samples,
            "seconds": time.perf_counter() - started,
        }
    )
    if verdict != FEASIBLE:
        return False
    data, _static = setup.static(candidate, record.plan, number, record.measurement)
    measured = dataclasses.replace(record.measurement, metric=ev.metric, size_bytes=len(data))
    values = tuple(
        ev.constraint_values[i] if i in ev.constraint_values else c.value(measured, setup.baseline)
        for i, c in enumerate(setup.constraints)
    )
    chosen = dataclasses.replace(
        record,
        measurement=measured,
        objective=setup.goal(measured),
        constraints=values,
        fidelity="full",
        metric_se=ev.metric_se,
    )
    if not chosen.feasible:  # a size constraint the re-encoded file broke
        return False
    out.chosen, out.data = chosen, data
    return True


def verified_note(verified: Verified) -> str | None:
    """A sentence for ``Result.notes`` on what the verification read and chose."""
    if not verified.read:
        return None
    read = ", ".join(f"{r['trial']} ({r['verdict']}, {r['val_samples']:,} more samples)" for r in verified.read)
    outcome = (
        f"trial {verified.chosen.number} is the answer."
        if verified.chosen is not None
        else "none was accepted, so the answer is the best trial decided during the search."
    )
    return (
        "Capped trials (read on a subsample, `Sequential.trial_samples`) verified on the whole search set: "
        f"{read}; {outcome}"
    )


def _decision_attrs(decision: Any, session: SequentialSession) -> dict[str, Any]:
    return {
        "verdict": decision.verdict,
        "futile": decision.futile,
        "looks": [
            {
                "samples": look.samples,
                "values": [e.mean for e in look.estimates],
                "se": [e.se for e in look.estimates],
                "verdict": look.verdict,
            }
            for look in decision.looks
        ],
        "search_samples": len(session.search_idx),
    }


def incumbent_objective(observed: TrialRecord | None, trial: Any) -> float | None:
    """The objective a candidate must improve on to be promoted: the one the sampler says it works
    from (``INCUMBENT_ATTR``; ``bo`` passes over a best trial that met the constraint by luck, and
    its suggestions then aim between the two, which were all screened before: 17 of 30 trials on
    one digits seed), else the best feasible trial observed so far."""
    try:
        stated = trial_system_attrs(trial).get(INCUMBENT_ATTR)
    except AttributeError:  # not an Optuna trial (e.g. a test double)
        stated = None
    if stated is not None:
        return float(stated)
    return None if observed is None else observed.objective


def told_infeasible(predicted: tuple[float, ...]) -> tuple[float, ...]:
    """Central predictions of a candidate passed over for promotion, as told to the search: with
    several constraints each can be predicted met while all of them together are unlikely; the
    largest is then told as just broken (``+1e-9``), since a stopped trial must read as infeasible
    to samplers that trust a trial's constraint values."""
    if not predicted or max(predicted) > 0:
        return predicted
    worst = max(range(len(predicted)), key=lambda j: predicted[j])
    return tuple(1e-9 if j == worst else v for j, v in enumerate(predicted))
