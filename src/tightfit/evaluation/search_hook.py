"""How ``compress`` evaluates one plan under ``evaluation=Sequential(...)``: fidelity levels, the
sequential test, and the per-trial accounting the search and the reports read.

Levels: a candidate that could improve the current answer (objective at least
``Sequential.min_improvement`` below the incumbent the sampler says it works from, or else below
the best feasible trial so far; size constraints met) is *promoted*: fine-tuned in full, then
evaluated sequentially until its constraints are decided. Any other candidate is *screened*: no
fine-tune, first look only. It can never be the answer, and it costs a few dozen forward passes
instead of a fine-tune and a full evaluation. Until the stages below are calibrated it is told to Optuna as PRUNED (its objective as
the intermediate value, no constraint values), which TPE ranks after the completed feasible
trials. Once they are, it is told as a completed trial whose constraint values are predicted: its
untuned estimate minus the mean gain the whole fine-tune gave the calibration curves. Model-based
samplers (``bo``, the level-set warm start) read only completed trials; told as PRUNED, a
screened plan stayed invisible to them and they kept proposing similar plans (measured: 22 of 30
trials screened on digits, see docs/benchmarks.md).

Stages (``Sequential.stages``, see ``.stages``): a promoted candidate's fine-tune is checked at
fractions of its steps on the stage samples and *stopped* when it surely cannot meet a constraint
after the remaining steps (told the optimistic prediction of its final values, still > 0), or when
it is less likely than ``Sequential.promote_probability`` to meet them (successive promotion; told
its central prediction). Either way it is told to the search as a completed, infeasible trial
(fidelity ``"stopped"``, the reason in ``stop_reason``), so a model of the constraint learns that
the region fails. Candidates fine-tuned in full store their curve (values at each stage and at the
end on the same samples), which calibrates both rules for later candidates. Optuna's pruner interface is not used: its
intermediate values are read by samplers as *objective* values, while these are constraint values.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..operators.plan import Plan, apply_plan_inplace
from ..records import Measurement, TrialRecord
from ..search.base import INCUMBENT_ATTR
from ..search.loop import TrialOutcome
from ..search.pick import PREDICTION_SE_ATTR
from .constraints import Constraint
from .sequential import SequentialSession
from .stages import (
    CURVE_ATTR, Curve, EarlyStop, curves_of, feasible_probability, hopeless, planned_steps, stage_steps, staged, tuned_prediction,
    tuned_prediction_spread,
)

StaticMeasure = Callable[..., "tuple[bytes, Measurement]"]  # (candidate, plan, trial number, reuse=None)


def sequential_plan_evaluator(
    *,
    session: SequentialSession,
    original: nn.Module,
    strategy: Any,
    recovery_for: Callable[[Any], tuple[Callable[[nn.Module], None] | None, dict[str, Any]]],
    seed: int,
    constraints: Sequence[Constraint],
    baseline: Measurement,
    objective: str,
    best_holder: dict[str, Any],
    run: Any,
    counter: Any,
    better: Callable[[TrialRecord, TrialRecord | None], bool],
    static: StaticMeasure,
    keep_best: bool = True,
) -> Callable[[Plan, Any], TrialOutcome]:
    """``recovery_for(trial) -> (finetune or None, tuned settings)``: the trial's recovery (tuned
    recovery searches its own settings). ``keep_best``: False in a worker, which keeps no files."""
    screen_enabled = session.config.screen

    def goal_of(measured: Measurement) -> float:
        return float({"size": measured.size_bytes, "nonzeros": measured.nonzeros, "flops": measured.flops}[objective])

    def evaluate_plan(plan: Plan, trial: Any) -> TrialOutcome:
        counter.take()
        started = time.perf_counter()
        candidate = apply_plan_inplace(plan, copy.deepcopy(original), strategy)
        data, measured = static(candidate, plan, trial.number)
        goal = goal_of(measured)
        fixed_ok = all(constraints[i].value(measured, baseline) <= 0 for i in session.fixed)
        reference = _incumbent_objective(best_holder["record"], trial)
        promising = fixed_ok and (reference is None or goal < reference * (1 - session.config.min_improvement))
        level = "full" if (promising or not screen_enabled) else "screen"

        finetune, tuned = recovery_for(trial)
        steps = 0 if finetune is not None else None
        evaluations: list[dict[str, Any]] = []  # the trial's cost, stage by stage
        at_steps: list[int] = []
        passed: list[torch.Tensor] = []  # constraint statistics on the stage samples at each stage passed
        stop: dict[str, Any] = {}
        total = planned_steps(finetune) if finetune is not None else None
        staging = bool(total and session._forms and session.config.stages)
        curves = curves_of(trial.study.get_trials(deepcopy=False), total) if staging else []
        untuned = None  # constraint statistics on the stage samples before fine-tuning
        if level == "full" and finetune is not None:
            at_steps = stage_steps(total, session.config.stages) if staging else []
            # the untuned look (what a screen would have seen) costs passes: only the first
            # max_curves curves start with one; every curve has its stages and end (free: the
            # stage looks are taken anyway and the end is read by the sequential test)
            record_curve = bool(at_steps) and sum(c.untuned is not None for c in curves) < session.config.max_curves
            if record_curve:
                looked = time.perf_counter()
                untuned = session.stage_statistics(session.stage_values(candidate))
                evaluations.append({"level": "untuned", "val_samples": len(untuned), "seconds": time.perf_counter() - looked})
            last = {"t": time.perf_counter(), "steps": 0}

            def check(stage: int, taken: int) -> bool:
                values = session.stage_values(candidate)
                stats = session.stage_statistics(values)
                estimates = session.stage_estimates(stats)
                means, ses = [e.mean for e in estimates], [e.se for e in estimates]
                hopeless_now, predicted = hopeless(
                    means, ses, curves, stage, z=session.stage_z, slack=session.config.stop_slack,
                    min_curves=session.config.min_curves,
                )
                reason = "hopeless" if hopeless_now else None
                promotion = feasible_probability(means, ses, curves, stage, min_curves=session.config.min_curves)
                if not hopeless_now and promotion is not None and promotion.probability < session.config.promote_probability:
                    hopeless_now, reason, predicted = True, "unpromising", _told_infeasible(promotion.predicted)
                now = time.perf_counter()
                evaluations.append({
                    "level": "stage", "stage": stage, "fraction": taken / total, "finetune_steps": taken - last["steps"],
                    "val_samples": len(values), "values": means, "se": ses,
                    "seconds": now - last["t"], "stop": hopeless_now, "stop_reason": reason,
                    "p_feasible": promotion.probability if promotion is not None else None,
                })
                last.update(t=now, steps=taken)
                passed.append(stats)
                if hopeless_now:
                    # the prediction's uncertainty, which the final pick reads: its spread when it is central
                    sd = max(promotion.sd) if reason == "unpromising" else max(ses)
                    stop.update(predicted=predicted, estimates=estimates, metric=session.paired_metric(values), steps=taken,
                                reason=reason, sd=sd, look_se=max(ses))
                return hopeless_now

            with torch.random.fork_rng(), staged(candidate, at_steps, check):
                torch.manual_seed(seed)
                try:
                    finetune(candidate)
                except EarlyStop:
                    pass
            if stop:
                steps = stop["steps"]
                return _stopped_outcome(stop, plan, measured, goal, constraints, baseline, session, evaluations, tuned, counter, started)
            steps = getattr(finetune, "steps_taken", None)
            # weights changed (the compressed file with them), masks did not: nonzeros and FLOPs stay
            data, measured = static(candidate, plan, trial.number, measured)
            goal = goal_of(measured)
            if at_steps:
                evaluations.append({"level": "finetune", "finetune_steps": (steps or 0) - last["steps"],
                                    "seconds": time.perf_counter() - last["t"]})

        eval_started = time.perf_counter()
        ev = session.evaluate(candidate, level=level)
        measured = Measurement(ev.metric, measured.size_bytes, measured.nonzeros, measured.weight_params, measured.flops)
        values = [ev.constraint_values[i] if i in ev.constraint_values else c.value(measured, baseline) for i, c in enumerate(constraints)]
        predicted = None
        prediction_se = None
        extra = 0  # samples read besides the sequential test's (stage samples, the untuned look)
        calibrated = sum(c.untuned is not None for c in curves) >= session.config.min_curves
        if level == "screen" and staging and calibrated:
            # Told as a completed trial with the values fine-tuning would likely give it (calibrated
            # on the curves), so that model-based samplers, which ignore PRUNED trials, learn its
            # objective and stop proposing it; its fidelity keeps it from ever being the answer.
            # the screen's own look (an unbiased estimate of the untuned value, like the curves' one)
            predicted = tuned_prediction(
                [float(v) for v in session.stage_statistics(ev.values).mean(0)], curves, min_curves=session.config.min_curves
            )
            if predicted is not None:
                predicted_of = dict(zip(session.linear, predicted))
                values = [predicted_of.get(i, v) for i, v in enumerate(values)]
                spread = tuned_prediction_spread(curves)
                if spread:  # the told values' uncertainty: the look's and the whole fine-tune's gain spread
                    prediction_se = (ev.metric_se**2 + max(spread) ** 2) ** 0.5
        curve = None
        if at_steps and len(passed) == len(at_steps):  # calibration for later candidates
            final = session.stage_statistics(session.stage_values(candidate, ev.values))  # same samples, fully tuned
            extra = max(0, len(final) - ev.samples)
            curve = Curve(
                total_steps=total, samples=len(final),
                stages=tuple(tuple(float(v) for v in stats.mean(0)) for stats in passed),
                final=tuple(float(v) for v in final.mean(0)),
                gain_se=tuple(session.gain_se(stats, final) for stats in passed),
                untuned=tuple(float(v) for v in untuned.mean(0)) if untuned is not None else None,
            )
        record = TrialRecord(trial.number, "COMPLETE", plan, measured, goal, tuple(values), fidelity=level)
        if keep_best and level == "full" and record.feasible and better(record, best_holder["record"]):
            best_holder.update(record=record, bytes=data)
            if run is not None:
                run.write_best(data)
        passes = counter.take()
        seconds = time.perf_counter() - started
        decision = ev.decision
        evaluations.append({"level": level, "val_samples": ev.samples + extra, "finetune_steps": 0 if at_steps else steps,
                            "seconds": time.perf_counter() - eval_started})
        return TrialOutcome(
            objective=goal,
            constraints=values,
            pruned=level == "screen" and predicted is None,
            attrs={
                "screen_constraints": values if level == "screen" else None,
                "screen_prediction": list(predicted) if predicted is not None else None,
                "plan": plan.to_dict(),
                "measurement": measured.to_dict(),
                "finetune_steps": steps,
                # the search's model reads a screen at the look's noise: it cannot improve the answer
                # anyway, and read at its prediction's wide spread it taught ``bo`` nothing (in a
                # digits run bo then proposed the same plan nine times in a row); the final pick
                # reads the spread
                "metric_se": ev.metric_se,
                **({PREDICTION_SE_ATTR: prediction_se} if prediction_se is not None else {}),
                "val_samples": passes if passes is not None else sum(e.get("val_samples", 0) for e in evaluations),
                "fidelity": level,
                "stage_reached": 1.0 if level == "full" else 0.0,
                "sequential": {
                    "verdict": decision.verdict,
                    "looks": [
                        {"samples": look.samples, "values": [e.mean for e in look.estimates], "se": [e.se for e in look.estimates], "verdict": look.verdict}
                        for look in decision.looks
                    ],
                    "search_samples": len(session.search_idx),
                },
                "evaluations": evaluations,
                **({CURVE_ATTR: curve.to_dict()} if curve is not None else {}),
                **({"recovery": tuned} if tuned else {}),
            },
        )

    return evaluate_plan


def _incumbent_objective(observed: TrialRecord | None, trial: Any) -> float | None:
    """The objective a candidate must improve on to be promoted: the one the sampler says it works
    from (``search.base.INCUMBENT_ATTR``; ``bo`` passes over a best trial that met the constraint by
    luck, and its suggestions then aim between the two, which were all screened before: 17 of 30
    trials on one digits seed), else the best feasible trial observed so far."""
    try:
        stated = trial.study._storage.get_trial_system_attrs(trial._trial_id).get(INCUMBENT_ATTR)
    except AttributeError:  # not an Optuna trial (e.g. a test double)
        stated = None
    if stated is not None:
        return float(stated)
    return None if observed is None else observed.objective


def _told_infeasible(predicted: tuple[float, ...]) -> tuple[float, ...]:
    """Central predictions of a candidate passed over for promotion, as told to the search: with
    several constraints each can be predicted met while all of them together are unlikely; the
    largest is then told as just broken (``+1e-9``), since a stopped trial must read as infeasible
    to samplers that trust a trial's constraint values."""
    if not predicted or max(predicted) > 0:
        return predicted
    worst = max(range(len(predicted)), key=lambda j: predicted[j])
    return tuple(1e-9 if j == worst else v for j, v in enumerate(predicted))


def _stopped_outcome(stop, plan, measured, goal, constraints, baseline, session, evaluations, tuned, counter, started) -> TrialOutcome:
    """A candidate stopped at a stage: completed and infeasible, told with the optimistic
    predictions of its final constraint values (> 0 for the one that stopped it) and the stage
    estimate of its metric. Never the answer: fidelity "stopped", no file kept."""
    measured = Measurement(stop["metric"], measured.size_bytes, measured.nonzeros, measured.weight_params, measured.flops)
    predicted_of = dict(zip(session.linear, stop["predicted"]))
    values = [predicted_of[i] if i in predicted_of else c.value(measured, baseline) for i, c in enumerate(constraints)]
    passes = counter.take()
    return TrialOutcome(
        objective=goal,
        constraints=values,
        attrs={
            "plan": plan.to_dict(),
            "measurement": measured.to_dict(),
            "finetune_steps": stop["steps"],
            # the search's model reads the prediction at the stage look's own noise, as a screen's:
            # the prediction's spread overstates its error (replayed digits searches: errors of
            # 0.4-0.6 spreads, benchmarks/stage_predictors.py), and at that spread ``bo`` learned
            # little from a stop and proposed near-copies of the stopped plan (4 in a row on mnist1d
            # seed 1); the final pick reads the spread (PREDICTION_SE_ATTR)
            "metric_se": stop["look_se"],
            PREDICTION_SE_ATTR: stop["sd"],
            "val_samples": passes if passes is not None else sum(e.get("val_samples", 0) for e in evaluations),
            "fidelity": "stopped",
            "stop_reason": stop["reason"],
            "stage_reached": evaluations[-1]["fraction"],
            "evaluations": evaluations,
            **({"recovery": tuned} if tuned else {}),
        },
    )


__all__ = ["sequential_plan_evaluator"]
