"""The per-dimension sensitivity scan: each dimension pushed alone from its gentle end towards its
aggressive end, the plan probed without fine-tuning. From it, a one-knob family of plans that
compresses insensitive dimensions first (the low-dimensional parametrization the BO warm-starts on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..operators.plan import Plan
from .context import SearchContext
from .encoding import UnitEncoding

LEVELS = np.array([0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 1.0])

#: The scan's probes at most, about 30 dimensions at every level. Past it each dimension gets fewer
#: levels (at least 3, spread over LEVELS, the aggressive end kept), so a model of hundreds of layers
#: is scanned in time bounded by this, not growing with its depth (61 layers, 122 dimensions: 1,343
#: probes took 76 s of an 85 s run on a toy model whose trials cost nothing).
MAX_SCAN_PROBES = 330


#: probes a run without fine-tuning may make, as a share of its budget: there a probe costs what a
#: trial's evaluation costs, so the scan and the warm starts take at most 0.4 x budget evaluations and
#: a run of budget N stays near 1.4 N evaluations (issue 18: on tiny-lm at budget 30 `bo` made 37 probes,
#: the scan capped only by MAX_SCAN_PROBES; docs/evidence.md). At least MIN_PROBES, so the scan sees something.
PROBE_SHARE = 0.4
MIN_PROBES = 4
#: the same share with fine-tuning: a probe is one evaluation, a trial a fine-tune plus one, so 2 x
#: budget probes cost at most 2 / (1 + F) of the trials' time when a fine-tune costs F evaluations
#: (F >= 1 keeps the scan within the search's own time). Before, only MAX_SCAN_PROBES bounded it: 89
#: probes of 5,000 images before the first trial on fmnist-resnet at budget 15 (docs/evidence.md).
FINETUNED_PROBE_SHARE = 2.0


def probe_allowance(budget: int, finetuned: bool = False) -> int:
    """Probes a run of ``budget`` trials may make: ``PROBE_SHARE`` x budget when a trial costs one
    evaluation (``finetune=None``), ``FINETUNED_PROBE_SHARE`` x budget when it also fine-tunes."""
    share = FINETUNED_PROBE_SHARE if finetuned else PROBE_SHARE
    return int(min(MAX_SCAN_PROBES, max(MIN_PROBES, share * budget)))


def probes_made(context: SearchContext) -> int:
    """Distinct plans probed so far in this run."""
    return len(context.memo.get("probe_violation", {}))


def probes_left(context: SearchContext) -> int | None:
    """Probes this run may still make: None when unbounded (``max_probes`` unset)."""
    if context.max_probes is None:
        return None
    return max(0, context.max_probes - probes_made(context))


def can_probe(context: SearchContext, plan: Plan) -> bool:
    """Whether ``plan`` may be probed: already probed (free), or within the allowance."""
    left = probes_left(context)
    return left is None or left > 0 or _key(plan) in context.memo.get("probe_violation", {})


def _key(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


def scan_levels(d: int, max_probes: int = MAX_SCAN_PROBES) -> np.ndarray:
    """The levels each of ``d`` dimensions is probed at: all of LEVELS while ``d * 11`` probes fit
    ``max_probes``, else an evenly spread subset (at least 3 levels, the aggressive end kept)."""
    n = int(np.clip(max_probes // max(d, 1), 3, len(LEVELS)))
    return spread_levels(n)


def spread_levels(n: int) -> np.ndarray:
    """``n`` of LEVELS evenly spread, the aggressive end kept."""
    if n >= len(LEVELS):
        return LEVELS.copy()
    return LEVELS[np.unique(np.round(np.linspace(0, len(LEVELS) - 1, n)).astype(int))]


def dimension_groups(enc: UnitEncoding, n_groups: int) -> list[np.ndarray]:
    """``n_groups`` (or fewer) groups of dimensions scanned together: each kind (operator and
    hyperparameter) split into runs of consecutive layers, so neighbouring layers of one kind share a
    probe and no probe mixes, say, a sparsity with a bit width."""
    kinds: dict[tuple[str, str], list[int]] = {}
    for i, dim in enumerate(enc.dims):
        kinds.setdefault((dim.operator, dim.hyperparameter.name), []).append(i)
    per_kind = max(1, n_groups // max(1, len(kinds)))
    groups: list[np.ndarray] = []
    for members in kinds.values():
        groups.extend(np.array_split(np.array(members), min(per_kind, len(members))))
    return groups


def distinct_probes(
    enc: UnitEncoding, groups: list[np.ndarray], levels: np.ndarray, decoded: dict[float, list[str]] | None = None
) -> int:
    """How many distinct plans (the all-gentle one included) a scan of ``groups`` at ``levels``
    probes, counted from the decoded settings without probing anything (``decoded``: each
    dimension's setting per level, 0 included, from :func:`decoded_levels`)."""
    decoded = decoded if decoded is not None else decoded_levels(enc)
    base = decoded[0.0]
    seen = set()
    for g, members in enumerate(groups):
        gentle = tuple(base[i] for i in members)
        for level in levels:
            key = tuple(decoded[float(level)][i] for i in members)
            if key != gentle:
                seen.add((g, key))
    return 1 + len(seen)


def decoded_levels(enc: UnitEncoding) -> dict[float, list[str]]:
    """Each dimension's setting (as text) at 0 and at every scan level."""
    out = {}
    for level in np.concatenate([[0.0], LEVELS]):
        params = enc.decode(np.full(enc.d, level))
        out[float(level)] = [str(params[k]) for k in enc.keys]
    return out


def scan_design(enc: UnitEncoding, allowance: int | None) -> tuple[list[np.ndarray], np.ndarray] | None:
    """The finest scan that fits ``allowance`` probes: every dimension alone (``scan_levels``), else
    fewer levels, else groups of neighbouring layers (a tenth fewer until it fits); None if not even one
    group at two levels fits. Deterministic, so a resumed run scans the same."""
    singles = [np.array([i]) for i in range(enc.d)]
    if allowance is None:
        return singles, scan_levels(enc.d)
    decoded = decoded_levels(enc)
    n_groups = enc.d
    while True:
        groups = singles if n_groups >= enc.d else dimension_groups(enc, n_groups)
        for n in range(len(scan_levels(len(groups))), 1, -1):
            levels = spread_levels(n)
            if distinct_probes(enc, groups, levels, decoded) <= allowance:
                return groups, levels
        if n_groups <= 1:
            return None
        n_groups -= max(1, n_groups // 10)  # a tenth fewer (at least one): ~40 steps from 300 dimensions


@dataclass(frozen=True)
class Sensitivity:
    """``violation[i, j]``: the probed constraint value with dimension ``i`` (and the others of its
    group, :func:`dimension_groups`) at ``levels[j]`` and all others at their gentle end; ``base``: the
    same with every dimension gentle."""

    levels: np.ndarray
    violation: np.ndarray
    base: float
    seconds: float
    #: groups of dimensions probed together (the number of dimensions when each was probed alone)
    groups: int = 0

    def envelope(self) -> np.ndarray:
        """Running maximum along the levels, so a noisy curve never looks safer further out."""
        return np.maximum.accumulate(self.violation, axis=1)

    def safe_knob(self) -> float:
        """The largest knob whose tolerance is <= 0: every dimension at its level met the
        constraint on its own (a start that costs no probe; together they may not)."""
        taus = np.unique(np.concatenate([[self.base], self.envelope().ravel()]))
        ok = np.flatnonzero(taus <= 0)
        return float(ok.max() / max(1, len(taus) - 1)) if ok.size else 0.0

    def family(self, u: float) -> np.ndarray:
        """The plan of the knob ``u`` in [0, 1]: tolerance ``tau`` rises with ``u`` through the
        observed violations; each dimension goes as far as its own curve stays below ``tau``."""
        env = self.envelope()
        taus = np.unique(np.concatenate([[self.base], env.ravel()]))
        tau = float(np.interp(u * (len(taus) - 1), np.arange(len(taus)), taus))
        x = np.zeros(env.shape[0])
        levels = np.concatenate([[0.0], self.levels])
        for i, curve in enumerate(env):
            curve = np.concatenate([[self.base], curve])
            ok = np.flatnonzero(curve <= tau)
            j = int(ok.max()) if ok.size else 0
            if j + 1 < len(levels) and curve[j + 1] > curve[j]:
                # interpolate within the step, so the knob moves plans continuously
                frac = np.clip((tau - curve[j]) / (curve[j + 1] - curve[j]), 0.0, 1.0)
                x[i] = levels[j] + frac * (levels[j + 1] - levels[j])
            else:
                x[i] = levels[j]
        return x


def probe_violation(context: SearchContext, plan: Plan) -> float:
    """The probed constraint value of ``plan``, each distinct plan probed once per run. Different
    points of the cube often decode to the same plan (a bit-width dimension has 3 choices but the
    scan visits 11 levels; the level-0.2 plan of such a dimension is the all-gentle one), and a
    probe of the same plan measures the same model."""
    cache = context.memo.setdefault("probe_violation", {})
    key = _key(plan)
    if key not in cache:
        assert context.probe is not None, "probe_violation needs a search context with a probe"
        cache[key] = context.probe(plan).violation
    return cache[key]


def sensitivity_scan(context: SearchContext) -> Sensitivity | None:
    """Memoized per run (the probes are deterministic, so a resumed run scans the same). Within the
    run's probe allowance (:func:`scan_design`; None when not even a coarse scan fits)."""
    if context.probe is None:
        return None
    if "sensitivity" in context.memo:
        return context.memo["sensitivity"]
    enc = UnitEncoding(context.space)
    started = time.perf_counter()
    left = probes_left(context)
    # the all-gentle plan may be probed already (then it is free): one more probe fits
    design = scan_design(enc, None if left is None else left + (1 if _gentle_probed(context, enc) else 0))
    if design is None:
        context.memo["sensitivity"] = None
        return None
    groups, levels = design
    base = probe_violation(context, context.space.plan(enc.decode(np.zeros(enc.d))))
    viol = np.zeros((enc.d, len(levels)))
    for members in groups:
        for j, level in enumerate(levels):
            x = np.zeros(enc.d)
            x[members] = level
            viol[members, j] = probe_violation(context, context.space.plan(enc.decode(x)))
    result = Sensitivity(levels, viol, float(base), time.perf_counter() - started, len(groups))
    context.memo["sensitivity"] = result
    return result


def _gentle_probed(context: SearchContext, enc: UnitEncoding) -> bool:
    return _key(context.space.plan(enc.decode(np.zeros(enc.d)))) in context.memo.get("probe_violation", {})


def largest_feasible_knob(context: SearchContext, plan_at: Callable[[float], np.ndarray], memo_key: str) -> float:
    """The largest knob of ``np.linspace(0.05, 1, 20)`` whose probe (no fine-tune) meets the
    constraint, found by bisection (at most 5 probes; the knob's plans compress more as it rises),
    within the run's probe allowance; 0.5 without a probe or an allowance left, 0.0 if none meets it.
    ``plan_at(u)``: the plan (a point of the cube) at knob ``u``. Memoized under ``memo_key``."""
    if context.probe is None:
        return 0.5
    if memo_key not in context.memo:
        enc = UnitEncoding(context.space)
        grid = np.linspace(0.05, 1.0, 20)
        lo, hi = -1, len(grid)  # grid[lo] met the constraint, grid[hi] did not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            plan = context.space.plan(enc.decode(plan_at(float(grid[mid]))))
            if not can_probe(context, plan):
                break
            if probe_violation(context, plan) <= 0:
                lo = mid
            else:
                hi = mid
        if lo >= 0 or hi - lo <= 1:
            context.memo[memo_key] = float(grid[lo]) if lo >= 0 else 0.0
        else:  # the allowance ran out before a feasible knob was seen: halfway below the failed one
            context.memo[memo_key] = 0.5 * (float(grid[hi]) if hi < len(grid) else 1.0)
    return context.memo[memo_key]


def warm_start_point(context: SearchContext, enc: UnitEncoding) -> np.ndarray:
    """A starting plan for local searches (MADS, OLMP): on the sensitivity family, the largest knob
    whose probe (no fine-tune) still meets the constraint, since fine-tuning only recovers; the
    middle of the cube without a probe."""
    scan = sensitivity_scan(context)
    if scan is None:
        return np.full(enc.d, 0.5)
    return scan.family(largest_feasible_knob(context, scan.family, "warm_start.knob"))
