"""How a run evaluates one trial's plan: one contract (:class:`TrialEvaluator`), two
implementations (:class:`FullEvaluator` here, :class:`~tightfit.run.sequential.SequentialEvaluator`
for ``evaluation=Sequential(...)``) sharing the goal, the seeded recovery and the static
measurement through :class:`TrialSetup`."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
import torch
from torch import nn

from ..evaluation.constraints import RESOURCE_CONSTRAINTS, Constraint, MaxBits, MaxFlops, MaxSize
from ..evaluation.divergence import OutputDivergence
from ..evaluation.metrics import evaluate_metric
from ..export.artifact import to_bytes
from ..measure.analysis import count_nonzeros, layer_kind, sparse_flops
from ..measure.latency import Latency
from ..operators.calibrated import apply_plan_calibrated
from ..operators.compose import Compose
from ..operators.plan import Plan, apply_plan_inplace
from ..records import UNSET, Measurement, TrialAttrs, TrialRecord, better
from ..run_dir import RunDir
from ..search.context import ProbeResult, SearchContext
from ..search.loop import TrialOutcome
from ..search.sensitivity import probe_allowance
from ..search.space import SearchSpace
from .measuring import ForwardPasses, OriginalValues, StaticMeasure, one_weight, timed


class TrialEvaluator(Protocol):
    """Evaluates one plan of the search: ``evaluator(plan, trial) -> TrialOutcome`` (the objective,
    the constraint values and the trial's :class:`~tightfit.records.TrialAttrs`)."""

    def __call__(self, plan: Plan, trial: optuna.Trial) -> TrialOutcome: ...


class BestSoFar:
    """The best feasible full-fidelity trial this process has evaluated, with its file's bytes (so
    the answer is not evaluated twice); written to the run directory's ``best.tfz`` when kept."""

    def __init__(self, record: TrialRecord | None, run: RunDir | None, keep: bool) -> None:
        self.record = record
        self.data: bytes | None = None
        self.run = run
        self.keep = keep

    def offer(self, record: TrialRecord, data: bytes) -> None:
        if self.keep and record.feasible and better(record, self.record):
            self.record, self.data = record, data
            if self.run is not None:
                self.run.write_best(data)

    def bytes_of(self, number: int) -> bytes | None:
        """The kept file of trial ``number``: in memory, or the run directory's ``best.tfz``."""
        if self.record is not None and self.record.number == number and self.data is not None:
            return self.data
        if self.run is not None:
            return self.run.read_best(number)
        return None


@dataclass
class TrialSetup:
    """What both evaluators share: the original, how a plan is applied and recovered, the goal,
    the constraints and the baseline they are measured against, and the static measurement."""

    original: nn.Module
    strategy: Compose
    space: SearchSpace
    finetune: Any
    seed: int
    objective: str
    constraints: list[Constraint]
    baseline: Measurement
    static: StaticMeasure
    counter: ForwardPasses
    best: BestSoFar
    latency: Latency | None = None
    calibration: list[Any] | None = None

    def recovery_for(self, trial: Any) -> tuple[Any, dict[str, Any]]:
        """The trial's recovery and its tuned settings (tuned recovery searches its own settings)."""
        tuned = self.space.recovery_settings(trial.params)
        return (self.finetune.with_settings(**tuned) if tuned else self.finetune), tuned

    def candidate(self, plan: Plan) -> nn.Module:
        """The plan applied to a fresh copy of the original."""
        return apply_to_copy(plan, self.original, self.strategy, self.calibration)

    def goal(self, measured: Measurement) -> float:
        return measured.objective(self.objective)

    def constraint_values(self, measured: Measurement) -> list[float]:
        return [c.value(measured, self.baseline) for c in self.constraints]


def apply_to_copy(plan: Plan, original: nn.Module, strategy: Compose, calibration: list[Any] | None) -> nn.Module:
    """``plan`` applied to a fresh copy of ``original``: with ``calibration`` (a strategy with
    calibrated operators), layer by layer from those batches in their order, then BatchNorm
    statistics re-estimated on them (as ``compress_once`` does); deterministic, so a trial replayed
    at the end of a run or on a worker gives the same weights."""
    if calibration is None:
        return apply_plan_inplace(plan, copy.deepcopy(original), strategy)
    work = copy.deepcopy(original)
    return apply_plan_calibrated(plan, work, calibration, strategy, repair=("batchnorm",), original=original).model


def recover_seeded(
    recover: Callable[[nn.Module], None], candidate: nn.Module, seed: int, around: AbstractContextManager | None = None
) -> None:
    """Fine-tune ``candidate`` with the run's seed (the global RNG is left as it was), then put it
    in eval mode: it is measured as the original was, whatever mode a user's recovery left it in
    (in train mode a metric that does not call eval() reads dropout noise and batch statistics, and
    its passes would change the BatchNorm statistics saved next). ``around`` wraps the fine-tune
    (cheap evaluation's stage checks)."""
    with torch.random.fork_rng(), around if around is not None else nullcontext():
        torch.manual_seed(seed)
        recover(candidate)
    candidate.eval()


class FullEvaluator:
    """Every candidate fine-tuned and measured on the full validation set."""

    def __init__(self, setup: TrialSetup, evaluate: Any, multi: bool, original: OriginalValues) -> None:
        self.setup = setup
        self.evaluate = evaluate
        self.multi = multi
        self.original = original  # the original's per-sample values: each trial's paired s.e.

    def __call__(self, plan: Plan, trial: optuna.Trial) -> TrialOutcome:
        s = self.setup
        s.counter.take()
        candidate = s.candidate(plan)
        steps = tune_s = None
        recover, tuned = s.recovery_for(trial)
        if recover is not None:
            tune_started = time.perf_counter()
            recover_seeded(recover, candidate, s.seed)
            steps, tune_s = getattr(recover, "steps_taken", None), time.perf_counter() - tune_started
        metric, metric_se = self.original.metric(self.evaluate, candidate)
        data, static = s.static(candidate, plan, trial.number)
        measured = dataclasses.replace(static, metric=metric, **timed(s.latency, candidate))
        values = s.constraint_values(measured)
        goal = s.goal(measured)
        s.best.offer(TrialRecord(trial.number, "COMPLETE", plan, measured, goal, tuple(values)), data)
        return TrialOutcome(
            objective=[goal, float(metric)] if self.multi else goal,
            constraints=values,
            attrs=TrialAttrs(
                plan=plan,
                measurement=measured,
                finetune_steps=steps,
                finetune_s=tune_s,
                metric_se=metric_se,
                val_samples=s.counter.take(),
                fidelity="full",
                recovery=tuned or UNSET,
            ),
        )


def with_probe_cost(context: SearchContext, evaluate_plan: TrialEvaluator, counter: ForwardPasses):
    """Charge each trial with what the optimizer's probes (plans measured without fine-tuning, made
    while it prepared the suggestion) cost: validation samples and seconds, stored as the trial's
    ``probe_samples`` and ``probe_s``."""
    if context.probe is None:
        return context, evaluate_plan
    clock = {"s": 0.0}

    def timing(probe: Callable[[Plan], ProbeResult]) -> Callable[[Plan], ProbeResult]:
        def timed_probe(plan: Plan) -> ProbeResult:
            started = time.perf_counter()
            try:
                return probe(plan)
            finally:
                clock["s"] += time.perf_counter() - started

        return timed_probe

    def charged(plan: Plan, trial) -> TrialOutcome:
        passes, seconds = counter.take(), clock["s"]
        clock["s"] = 0.0
        outcome = evaluate_plan(plan, trial)
        outcome.attrs = dataclasses.replace(outcome.attrs, probe_samples=passes, probe_s=seconds)
        return outcome

    calibration_probe = timing(context.calibration_probe) if context.calibration_probe is not None else None
    return dataclasses.replace(context, probe=timing(context.probe), calibration_probe=calibration_probe), charged


def search_context(
    setup: TrialSetup,
    evaluate,
    budget: int,
    layer_names,
    example_input,
    n_objectives: int = 1,
    probe_inputs: list[Any] | None = None,
) -> SearchContext:
    """What samplers may use besides the trials: a probe that measures a plan *without* fine-tuning
    (the sensitivity scan and warm starts use it) and the original weights."""
    s = setup
    needs_bytes = s.objective == "size" or any(isinstance(c, (MaxSize, MaxBits)) for c in s.constraints)
    needs_flops = s.objective == "flops" or any(isinstance(c, MaxFlops) for c in s.constraints)
    # With a latency objective or constraint every probe is timed too: slower, but the only honest view.

    def probe(plan: Plan) -> ProbeResult:
        candidate = s.candidate(plan)
        metric = evaluate_metric(evaluate, candidate)
        nonzeros, _ = count_nonzeros(candidate, layer_names)
        measured = Measurement(
            metric=metric,
            size_bytes=len(to_bytes(candidate, plan)) if needs_bytes else s.baseline.size_bytes,
            nonzeros=nonzeros,
            weight_params=s.baseline.weight_params,
            flops=sparse_flops(candidate, example_input, layer_names) if needs_flops else None,
            **timed(s.latency, candidate),
        )
        return ProbeResult(metric, tuple(s.constraint_values(measured)), s.goal(measured))

    memo: dict[str, Any] = {}
    divergence: list[OutputDivergence] = []  # built on first use: the reference outputs cost forward passes

    def calibration_probe(plan: Plan) -> ProbeResult:
        """The plan's outputs against the original's on the calibration inputs, and its resources."""
        if not divergence:
            assert probe_inputs is not None
            divergence.append(OutputDivergence(s.original, probe_inputs))
            memo["calibration_probe.samples"] = divergence[0].samples
        candidate = s.candidate(plan)
        nonzeros, _ = count_nonzeros(candidate, layer_names)
        measured = Measurement(
            metric=math.nan,
            size_bytes=len(to_bytes(candidate, plan)) if needs_bytes else s.baseline.size_bytes,
            nonzeros=nonzeros,
            weight_params=s.baseline.weight_params,
            flops=sparse_flops(candidate, example_input, layer_names) if needs_flops else None,
            **timed(s.latency, candidate),
        )
        values = [c.value(measured, s.baseline) for c in s.constraints if isinstance(c, RESOURCE_CONSTRAINTS)]
        return ProbeResult(-divergence[0](candidate), tuple(values), math.nan)

    modules = dict(s.original.named_modules())
    weights = {name: one_weight(modules[name]) for name in layer_names if layer_kind(modules[name]) is not None}
    return SearchContext(
        space=s.space,
        budget=budget,
        seed=s.seed,
        probe=probe,
        # a probe costs one evaluation, a trial one (plus a fine-tune): bounded by the budget (issue 18)
        max_probes=probe_allowance(budget, finetuned=s.finetune is not None),
        weights=weights,
        objective=s.objective,
        n_objectives=n_objectives,
        calibration_probe=calibration_probe if probe_inputs is not None else None,
        memo=memo,
    )
