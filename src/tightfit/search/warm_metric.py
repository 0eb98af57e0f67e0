"""The warm start of ``objective="metric"`` (the most accurate plan within a resource budget).

Sensitivities on the calibration data: each search dimension (one operator setting of one layer) is
set alone to each of its levels, every other dimension at its gentle end, and the plan is probed
without fine-tuning (``SearchContext.calibration_probe``): how far its outputs moved from the
original's on the calibration inputs (KL of the logits) and its resource constraints. Never the
validation data: that judges the trials, and the probes choose them. Every level of a choice
dimension (a bit width) is probed; a numeric dimension's grid is thinned past :data:`MAX_WARM_PROBES`
and the levels left unprobed are interpolated.

From the table, an allocation at the budget: per dimension the level minimizing
``divergence + lambda * resource``, ``lambda`` the smallest whose (additive) estimate meets the
budget, checked by a measurement of the whole plan, then filled back up to the budget step by
measured step (as the greedy baseline does). The search's first trials are that filled plan, the
allocation itself, and a more compressed neighbour; then a local search around the best trial
(:mod:`tightfit.search.swap`), TPE only once it has nothing left to propose (28 TPE trials after the
warm plans found nothing better on fmnist-mobilenet, 13 of them over the budget: docs/calibration.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from ..operators.plan import Plan
from ..optuna_compat import cached_trials
from .context import ProbeResult, SearchContext
from .encoding import UnitEncoding, in_space, unit_levels
from .loop import trial_position
from .swap import incumbent_of, propose

#: the probes a numeric dimension's grid takes at most over the table; past it each numeric dimension
#: is probed at fewer levels (at least 2, the most aggressive kept) and the rest interpolated. Choice
#: dimensions are probed at every level: interpolating 5 bits between 4 and 6 (160 probes over
#: fmnist-mobilenet's 52 layers) made the allocation never choose 5 bits, where greedy gave 12 layers 5
MAX_WARM_PROBES = 400
#: the measured steps the final fill may take at most (per dimension)
FILL_PROBES_PER_DIM = 1
#: ctx.memo keys of the scan's table and of the local search's probes (levels -> divergence, constraints)
TABLE_MEMO = "warm_metric.table"
PROBED_MEMO = "warm_metric.probed"
#: the run's study attribute holding the warm start's cost and plans
WARM_ATTR = "warm_start"


@dataclass(frozen=True)
class WarmStart:
    """The first trials' parameters (in order), and what finding them cost: calibration probes,
    their samples each, and seconds."""

    params: list[dict[str, Any]]
    probes: int
    samples: int
    seconds: float
    table: dict[str, list[tuple[Any, float]]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probed_levels(n_levels: int, d: int, choice: bool = False) -> list[int]:
    """Which non-gentle levels (indices 1..n_levels-1) are probed: all of a choice dimension, all of
    a numeric one while ``d`` dimensions fit :data:`MAX_WARM_PROBES`, else an even spread that keeps
    the most aggressive."""
    rest = list(range(1, n_levels))
    if choice:
        return rest
    keep = int(np.clip(MAX_WARM_PROBES // max(d, 1), 2, len(rest))) if rest else 0
    if keep >= len(rest):
        return rest
    return sorted({rest[int(round(k))] for k in np.linspace(0, len(rest) - 1, keep)})


@dataclass
class Table:
    """Per dimension and level: the divergence added (running max over the levels, so a noisy
    curve never looks safer further out) and the constraint values moved, against all-gentle."""

    divergence: list[np.ndarray]
    resource: list[np.ndarray]  # [levels, constraints]
    base: np.ndarray  # constraint values of the all-gentle plan
    probes: int


def _fill(known: dict[int, Any], n: int) -> np.ndarray:
    """Values at levels 0..n-1 from those probed (linear between, the last held)."""
    xs = sorted(known)
    values = np.array([known[x] for x in xs], dtype=float)
    if values.ndim == 1:
        return np.interp(np.arange(n), xs, values)
    return np.stack([np.interp(np.arange(n), xs, values[:, k]) for k in range(values.shape[1])], axis=1)


def _scan(ctx: SearchContext, enc: UnitEncoding) -> Table:
    probe = ctx.calibration_probe
    assert probe is not None
    gentle = np.array([unit_levels(enc, i)[0] for i in range(enc.d)])
    base = probe(ctx.space.plan(enc.decode(gentle)))
    base_c = np.array(base.constraints, dtype=float)
    probes = 1
    divergence, resource = [], []
    for i in range(enc.d):
        levels = unit_levels(enc, i)
        div: dict[int, float] = {0: 0.0}
        res: dict[int, np.ndarray] = {0: np.zeros_like(base_c)}
        for j in probed_levels(len(levels), enc.d, enc.dims[i].hyperparameter.choices is not None):
            x = gentle.copy()
            x[i] = levels[j]
            got = probe(ctx.space.plan(enc.decode(x)))
            probes += 1
            div[j] = max(0.0, -got.metric - (-base.metric))
            res[j] = np.array(got.constraints, dtype=float) - base_c
        divergence.append(np.maximum.accumulate(_fill(div, len(levels))))
        resource.append(_fill(res, len(levels)))
    return Table(divergence, resource, base_c, probes)


def _choose(table: Table, lam: float, weights: np.ndarray) -> list[int]:
    return [int(np.argmin(div + lam * (res @ weights))) for div, res in zip(table.divergence, table.resource)]


def _estimate(table: Table, at: list[int], offset: np.ndarray) -> np.ndarray:
    return table.base + offset + sum(res[j] for res, j in zip(table.resource, at))


def _allocate(table: Table, weights: np.ndarray, offset: np.ndarray) -> tuple[list[int], float] | None:
    """The least-divergence allocation whose estimate meets every constraint, and its lambda
    (bisection on a log scale); None when not even the most compressed one does."""
    lo, hi = 1e-9, 1e9
    if np.max(_estimate(table, _choose(table, hi, weights), offset)) > 0:
        return None
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if np.max(_estimate(table, _choose(table, mid, weights), offset)) <= 0:
            hi = mid
        else:
            lo = mid
    return _choose(table, hi, weights), hi


def _fill_up(table: Table, at: list[int], offset: np.ndarray, weights: np.ndarray) -> list[int]:
    """Spend what the allocation left of the budget: move dimensions one level gentler, the most
    divergence removed per resource added first, while the estimate still meets the budget."""
    at = list(at)
    while True:
        best, best_ratio = None, -math.inf
        for i, j in enumerate(at):
            if j == 0:
                continue
            trial = at[:i] + [j - 1] + at[i + 1 :]
            if np.max(_estimate(table, trial, offset)) > 0:
                continue
            gain = table.divergence[i][j] - table.divergence[i][j - 1]
            cost = max(float((table.resource[i][j - 1] - table.resource[i][j]) @ weights), 1e-12)
            if gain / cost > best_ratio:
                best, best_ratio = i, gain / cost
        if best is None or best_ratio <= 0:
            return at
        at[best] -= 1


def fill_measured(
    table: Table, at: list[int], weights: np.ndarray, measured: Callable[[list[int]], np.ndarray], limit: int
) -> list[int]:
    """Spend what the estimate left of the budget, each step measured (the file of the whole plan,
    not the sum of per-layer effects): one dimension one level gentler, the most divergence removed
    per resource added first; a step that misses the budget is not tried again. ``at`` meets it."""
    at, blocked, probes = list(at), set(), 0
    while probes < limit:
        ranked = []
        for i, j in enumerate(at):
            if j == 0 or (i, j) in blocked:
                continue
            gain = table.divergence[i][j] - table.divergence[i][j - 1]
            cost = max(float((table.resource[i][j - 1] - table.resource[i][j]) @ weights), 1e-12)
            if gain > 0:
                ranked.append((-gain / cost, i))
        if not ranked:
            return at
        i = min(ranked)[1]
        trial = at[:i] + [at[i] - 1] + at[i + 1 :]
        probes += 1
        if np.max(measured(trial)) <= 0:
            at = trial
        else:
            blocked.add((i, at[i]))
    return at


def _plans(ctx: SearchContext, enc: UnitEncoding, table: Table) -> list[list[int]]:
    """The allocation at the budget (corrected by measuring it), filled up, and a neighbour."""
    probe = ctx.calibration_probe
    assert probe is not None
    weights = (table.base > 0).astype(float)
    if not weights.any():  # all-gentle already meets the budget
        return [[0] * enc.d]

    def measured(at: list[int]) -> np.ndarray:
        x = np.array([unit_levels(enc, i)[j] for i, j in enumerate(at)])
        return np.array(probe(ctx.space.plan(enc.decode(x))).constraints, dtype=float)

    offset = np.zeros_like(table.base)
    for _ in range(4):  # the estimate adds per-layer effects; the file of the whole plan decides
        found = _allocate(table, weights, offset)
        if found is None:
            return []
        at, lam = found
        got = measured(at)
        if np.max(got) <= 0:
            break
        offset += np.maximum(got - _estimate(table, at, offset), 1e-3 * weights)
    else:
        return []
    offset = got - _estimate(table, at, np.zeros_like(offset))
    out = []
    filled = _fill_up(table, at, offset, weights)
    if filled == at or np.max(measured(filled)) > 0:
        filled = at
    filled = fill_measured(table, filled, weights, measured, FILL_PROBES_PER_DIM * enc.d)
    if filled != at:
        out.append(filled)
    out.append(at)
    tighter = _choose(table, lam * 2.0, weights)
    if tighter != at and np.max(measured(tighter)) <= 0:
        out.append(tighter)
    return out


def _point(enc: UnitEncoding, at: Sequence[int]) -> np.ndarray:
    return np.array([unit_levels(enc, i)[j] for i, j in enumerate(at)])


def levels_of(enc: UnitEncoding, params: dict[str, Any]) -> tuple[int, ...]:
    """A plan's level per dimension (the nearest, for a numeric value off the grid)."""
    x = enc.encode(params)
    return tuple(int(np.argmin(np.abs(np.array(unit_levels(enc, i)) - x[i]))) for i in range(enc.d))


def warm_start(ctx: SearchContext) -> WarmStart | None:
    """The warm start (memoized per run; the probes are deterministic, so a resumed run finds the
    same plans); None without calibration data or dimensions."""
    if ctx.calibration_probe is None or not ctx.space.dimensions:
        return None
    if WARM_ATTR in ctx.memo:
        return ctx.memo[WARM_ATTR]
    started = time.perf_counter()
    enc = UnitEncoding(ctx.space)
    calls: list[int] = []
    counted = _counting(ctx, calls)
    table = _scan(counted, enc)
    ctx.memo[TABLE_MEMO] = table
    plans = _plans(counted, enc, table)
    params = [enc.decode(np.array([unit_levels(enc, i)[j] for i, j in enumerate(at)])) for at in plans]
    info = {
        dim.key: [
            (enc.decode(np.full(enc.d, lv))[dim.key], float(table.divergence[i][k]))
            for k, lv in enumerate(unit_levels(enc, i))
        ]
        for i, dim in enumerate(enc.dims)
    }
    samples = int(ctx.memo.get("calibration_probe.samples", 0))
    result = WarmStart(params, len(calls), samples, time.perf_counter() - started, info)
    ctx.memo[WARM_ATTR] = result
    return result


def _counting(ctx: SearchContext, calls: list[int]) -> SearchContext:
    """``ctx`` whose calibration probe appends to ``calls`` (the warm start's probe count)."""
    probe = ctx.calibration_probe
    assert probe is not None

    def counted(plan: Plan) -> ProbeResult:
        calls.append(1)
        return probe(plan)

    return dataclasses.replace(ctx, calibration_probe=counted)


class WarmStartSampler(optuna.samplers.BaseSampler):
    """The warm start's plans as the first trials (by position, so a resumed run or another worker
    draws the same), ``inner`` after them. Stores the warm start's cost on the study once."""

    def __init__(self, ctx: SearchContext, inner: optuna.samplers.BaseSampler, warm: WarmStart | None) -> None:
        self._ctx, self._inner, self._warm = ctx, inner, warm
        self._enc = UnitEncoding(ctx.space)
        self._params: dict[str, Any] | None = None

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._params = None
        if self._warm is not None:
            if WARM_ATTR not in study.user_attrs:
                summary = {k: v for k, v in self._warm.to_dict().items() if k != "table"}
                study.set_user_attr(WARM_ATTR, json.loads(json.dumps(summary)))
            trials = cached_trials(study)
            position = trial_position(trials, trial.number)
            if position < len(self._warm.params):
                self._params = self._warm.params[position]
            elif self._warm.params:
                self._params = self._local(trials, trial.number)
        self._inner.before_trial(study, trial)

    def _local(self, trials: list[optuna.trial.FrozenTrial], number: int) -> dict[str, Any] | None:
        """The local search's next plan around the best finished trial (None: TPE's turn)."""
        table = self._ctx.memo.get(TABLE_MEMO)
        probe = self._ctx.calibration_probe
        if table is None or probe is None:
            return None
        enc = self._enc
        keys = [dim.key for dim in enc.dims]
        done = [t for t in trials if t.number < number and t.state == TrialState.COMPLETE and in_space(t, keys)]
        incumbent = incumbent_of(done, lambda p: levels_of(enc, p))
        if incumbent is None:
            return None
        tried = {levels_of(enc, t.params) for t in trials if t.number != number and in_space(t, keys)}
        cache: dict[tuple[int, ...], tuple[float, np.ndarray]] = self._ctx.memo.setdefault(PROBED_MEMO, {})

        def probed(at: tuple[int, ...]) -> tuple[float, np.ndarray]:
            if at not in cache:
                got = probe(self._ctx.space.plan(enc.decode(_point(enc, at))))
                cache[at] = (-got.metric, np.array(got.constraints, dtype=float))
            return cache[at]

        moved = propose(table, incumbent, tried, probed)
        return None if moved is None else enc.decode(_point(enc, moved))

    def infer_relative_search_space(self, study, trial):
        return {} if self._params is not None else self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return {} if self._params is not None else self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self._params is not None and param_name in self._params:
            return self._params[param_name]
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def warm_tpe(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    """TPE after the warm start's plans, modelling from them at once (no random start-up trials)."""
    warm = warm_start(ctx)
    startup = max(1, len(warm.params)) if warm is not None and warm.params else max(3, min(10, ctx.budget // 3))
    inner = optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True, n_startup_trials=startup, constant_liar=True)
    return WarmStartSampler(ctx, inner, warm)
