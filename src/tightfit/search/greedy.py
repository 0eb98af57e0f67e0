"""A sensitivity-greedy allocation under a resource budget: the baseline ``objective="metric"``
must beat (what NVIDIA ModelOpt's ``auto_quantize`` does, greedily rather than with its solver).

Each dimension of the search space (one operator setting of one layer) is measured alone at each
of its levels, every other dimension at its gentle end (the setting nearest the operator's
identity): the metric it loses and the resource it saves. Then, from all-gentle, the step with the
least metric lost per unit of resource saved is taken, one level of one dimension at a time, until
the whole plan meets the budget (measured, not summed); then steps that overshot are undone, the
most costly first, while the plan still meets it. No fine-tuning anywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..evaluation.constraints import MaxBits, MaxFlops, MaxSize
from ..evaluation.metrics import evaluate_metric
from ..export.artifact import to_bytes
from ..measure.analysis import analyze, count_nonzeros, sparse_flops
from ..operators.base import Operator
from ..operators.calibrated import apply_plan_calibrated
from ..operators.compose import Compose, as_strategy
from ..operators.plan import Plan, apply_plan_inplace
from ..records import Measurement
from .encoding import UnitEncoding, unit_levels
from .space import SearchSpace, build_space


@dataclass
class GreedyResult:
    """The allocation: its plan, metric and measurement, whether it meets the budget, how many
    plans were evaluated with the metric (``evaluations``) and measured for the budget only
    (``measured``), and the sensitivity table (dimension key -> [(value, metric lost, constraint value)])."""

    plan: Plan
    metric: float
    measurement: Measurement
    feasible: bool
    evaluations: int
    measured: int
    sensitivity: dict[str, list[tuple[Any, float, float]]] = field(default_factory=dict)


@dataclass
class _Measurer:
    """Applies a plan to a copy of the model and measures the budget's resource and the metric."""

    model: nn.Module
    strategy: Compose
    evaluate: Callable[[nn.Module], float]
    constraints: list[Any]
    layer_names: list[str]
    example_input: Any
    calibration: list[Any] | None
    weight_params: int
    evaluations: int = 0
    measured: int = 0

    def candidate(self, plan: Plan) -> nn.Module:
        if self.calibration is None:
            return apply_plan_inplace(plan, copy.deepcopy(self.model), self.strategy)
        work = copy.deepcopy(self.model)
        return apply_plan_calibrated(plan, work, self.calibration, self.strategy, original=self.model).model

    def measure(self, plan: Plan, with_metric: bool) -> tuple[Measurement, float]:
        """The plan's measurement (metric NaN unless asked) and its budget violation (<= 0: met)."""
        candidate = self.candidate(plan)
        metric = math.nan
        if with_metric:
            metric = evaluate_metric(self.evaluate, candidate)
            self.evaluations += 1
        self.measured += 1
        nonzeros, _ = count_nonzeros(candidate, self.layer_names)
        flops = (
            sparse_flops(candidate, self.example_input, self.layer_names) if self.example_input is not None else None
        )
        measured = Measurement(metric, len(to_bytes(candidate, plan)), nonzeros, self.weight_params, flops)
        return measured, max(c.value(measured, measured) for c in self.constraints)


def _check(constraints: Sequence[Any], example_input: Any) -> list[Any]:
    items = [constraints] if not isinstance(constraints, (list, tuple)) else list(constraints)
    if not items or not all(isinstance(c, (MaxSize, MaxBits, MaxFlops)) for c in items):
        raise ConfigError(
            "greedy_allocation: `budget_constraint` must be MaxSize, MaxBits or MaxFlops (or a list of them): "
            f"a resource budget measured without the metric, but got {items!r}."
        )
    if any(isinstance(c, MaxFlops) for c in items) and example_input is None:
        raise ConfigError("greedy_allocation: MaxFlops needs `example_input`.")
    return items


def _scan(
    measurer: _Measurer, space: SearchSpace, encoding: UnitEncoding, base_metric: float
) -> tuple[list[list[float]], list[list[float]], dict[str, list[tuple[Any, float, float]]]]:
    """Per dimension and level: metric lost and budget violation, that dimension alone moved."""
    gentle = np.array([unit_levels(encoding, i)[0] for i in range(encoding.d)])
    loss: list[list[float]] = []
    violation: list[list[float]] = []
    table: dict[str, list[tuple[Any, float, float]]] = {}
    for i, dim in enumerate(encoding.dims):
        loss.append([])
        violation.append([])
        for level in unit_levels(encoding, i):
            x = gentle.copy()
            x[i] = level
            params = encoding.decode(x)
            measured, v = measurer.measure(space.plan(params), with_metric=True)
            loss[i].append(base_metric - measured.metric)
            violation[i].append(v)
            table.setdefault(dim.key, []).append((params[dim.key], base_metric - measured.metric, v))
    return loss, violation, table


def _next_step(loss: list[list[float]], violation: list[list[float]], at: list[int]) -> int | None:
    """The dimension whose next level loses the least metric per unit of budget it saves."""
    best, best_ratio = None, math.inf
    for i, level in enumerate(at):
        if level + 1 >= len(loss[i]):
            continue
        saved = violation[i][level] - violation[i][level + 1]
        lost = max(0.0, loss[i][level + 1] - loss[i][level])
        ratio = lost / saved if saved > 0 else math.inf if lost > 0 else 1e12
        if ratio < best_ratio:
            best, best_ratio = i, ratio
    return best


def _give_back(measurer: _Measurer, loss: list[list[float]], at: list[int], plan_at: Callable) -> None:
    """Greedy steps overshoot (a step may save far more than was missing): undo the steps that
    cost the most metric while the measured plan still meets the budget."""
    while True:
        undo = sorted((i for i, level in enumerate(at) if level > 0), key=lambda i: loss[i][at[i] - 1] - loss[i][at[i]])
        for i in undo:
            at[i] -= 1
            if measurer.measure(plan_at(at), with_metric=False)[1] <= 0:
                break
            at[i] += 1
        else:
            return


def greedy_allocation(
    model: nn.Module,
    strategy: Compose | Operator,
    evaluate: Callable[[nn.Module], float],
    budget_constraint: Any,
    *,
    example_input: Any = None,
    calibration: list[Any] | None = None,
) -> GreedyResult:
    """The sensitivity-greedy allocation of ``strategy``'s settings over ``model``'s layers under
    ``budget_constraint`` (MaxSize, MaxBits or MaxFlops; see the module docstring). ``model`` is not
    changed. Cost: one metric evaluation per dimension and level plus one for the answer, and one
    file measurement per greedy step."""
    constraints = _check(budget_constraint, example_input)
    strategy = as_strategy(strategy)
    original = copy.deepcopy(model).eval()
    for op in strategy:
        op.prepare(original, example_input)
    space = build_space(strategy, analyze(original))
    layer_names = list(space.fixed)
    _, total = count_nonzeros(original, layer_names)
    needs = any(op.needs_calibration() for op in strategy)
    if needs and calibration is None:
        raise ConfigError("greedy_allocation: calibrated operators (GPTQ, Wanda, SparseGPT) need `calibration`.")
    measurer = _Measurer(
        original, strategy, evaluate, constraints, layer_names, example_input, calibration if needs else None, total
    )
    encoding = UnitEncoding(space)
    base_metric = evaluate_metric(evaluate, original)
    loss, violation, table = _scan(measurer, space, encoding, base_metric)
    at = [0] * encoding.d

    def plan_at(levels: list[int]) -> Plan:
        x = np.array([unit_levels(encoding, i)[levels[i]] for i in range(encoding.d)])
        return space.plan(encoding.decode(x))

    while True:
        _, v = measurer.measure(plan_at(at), with_metric=False)
        step = _next_step(loss, violation, at) if v > 0 else None
        if step is None:
            break
        at[step] += 1
    if v <= 0:
        _give_back(measurer, loss, at, plan_at)
    plan = plan_at(at)
    final, v = measurer.measure(plan, with_metric=True)
    return GreedyResult(plan, final.metric, final, v <= 0, measurer.evaluations, measurer.measured, table)
