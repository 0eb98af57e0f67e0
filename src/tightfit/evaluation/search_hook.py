"""How ``compress`` evaluates one plan under ``evaluation=Sequential(...)``: fidelity levels, the
sequential test, and the per-trial accounting the search and the reports read.

Levels: a candidate that could improve the current answer (objective below the best feasible one
so far, size constraints met) is *promoted*: fine-tuned in full, then evaluated sequentially until
its constraints are decided. Any other candidate is *screened*: no fine-tune, first look only. Its
estimate still informs the sampler (``metric_se`` says how rough it is), but it can never be the
answer, and it costs a few dozen forward passes instead of a fine-tune and a full evaluation. It is
told to Optuna as PRUNED (its objective as the intermediate value, no constraint values): a sampler
such as TPE ranks it after the completed feasible trials and before the infeasible ones, as it would
a trial a pruner stopped early, and the untuned estimate never misleads the constraint model.
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
from ..search.loop import TrialOutcome
from .constraints import Constraint
from .sequential import SequentialSession

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
        incumbent = best_holder["record"]
        promising = fixed_ok and (incumbent is None or incumbent.objective is None or goal < incumbent.objective)
        level = "full" if (promising or not screen_enabled) else "screen"

        finetune, tuned = recovery_for(trial)
        steps = 0 if finetune is not None else None
        if level == "full" and finetune is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                finetune(candidate)
            steps = getattr(finetune, "steps_taken", None)
            # weights changed (the compressed file with them), masks did not: nonzeros and FLOPs stay
            data, measured = static(candidate, plan, trial.number, measured)
            goal = goal_of(measured)

        ev = session.evaluate(candidate, level=level)
        measured = Measurement(ev.metric, measured.size_bytes, measured.nonzeros, measured.weight_params, measured.flops)
        values = [ev.constraint_values[i] if i in ev.constraint_values else c.value(measured, baseline) for i, c in enumerate(constraints)]
        record = TrialRecord(trial.number, "COMPLETE", plan, measured, goal, tuple(values), fidelity=level)
        if keep_best and level == "full" and record.feasible and better(record, best_holder["record"]):
            best_holder.update(record=record, bytes=data)
            if run is not None:
                run.write_best(data)
        passes = counter.take()
        seconds = time.perf_counter() - started
        decision = ev.decision
        return TrialOutcome(
            objective=goal,
            constraints=values,
            pruned=level == "screen",
            attrs={
                "screen_constraints": values if level == "screen" else None,
                "plan": plan.to_dict(),
                "measurement": measured.to_dict(),
                "finetune_steps": steps,
                "metric_se": ev.metric_se,
                "val_samples": passes if passes is not None else ev.samples,
                "fidelity": level,
                "sequential": {
                    "verdict": decision.verdict,
                    "looks": [
                        {"samples": look.samples, "values": [e.mean for e in look.estimates], "se": [e.se for e in look.estimates], "verdict": look.verdict}
                        for look in decision.looks
                    ],
                    "search_samples": len(session.search_idx),
                },
                "evaluations": [{"level": level, "val_samples": ev.samples, "finetune_steps": steps, "seconds": seconds}],
                **({"recovery": tuned} if tuned else {}),
            },
        )

    return evaluate_plan


__all__ = ["sequential_plan_evaluator"]
