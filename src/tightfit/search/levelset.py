"""``search="levelset"``: the one-knob search described for Condensa.

One global knob ``u`` in [0, 1] sets the whole plan (by default the same sparsity for every layer;
quantization and other dimensions stay at their gentle end; with no continuous dimension, the same
bit width, or other choice, for every layer: :func:`uniform_family`). A 1-D GP models the constraint value
over ``u``; the next knob maximizes ``P(feasible at u) * (u - best feasible u)+``, i.e. constrained
improvement of the knob, which walks to the edge of the level set ``{u : constraint(u) <= 0}``;
when no improvement is plausible it samples where the boundary is most uncertain (the LSE
"straddle" rule). The GP's noise term makes it robust to a noisy, not quite monotone metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import optuna

from .base import History, PlanSampler
from .context import SearchContext
from .encoding import UnitEncoding
from .gp import clip_level, clip_violation, fit_gp, normal_cdf, posterior
from .sensitivity import largest_feasible_knob, sensitivity_scan

GRID = np.linspace(0.0, 1.0, 1001)
#: evaluations made by bisection before the GP takes over
BISECT = 4


def uniform_family(enc: UnitEncoding) -> Callable[[float], np.ndarray]:
    """One setting for every layer: the knob moves every continuous dimension together (a sparsity),
    the others stay gentle; with no continuous dimension (e.g. ``Quantize(bits=(2, 4, 8))`` alone),
    every dimension moves, so the knob walks through the uniform bit widths."""
    cont = np.array([enc.is_continuous(i) for i in range(enc.d)], dtype=float)
    moved = cont if cont.any() else np.ones(enc.d)

    def plan(u: float) -> np.ndarray:
        return moved * u

    return plan


def segments(enc: UnitEncoding, family: Callable[[float], np.ndarray], grid: np.ndarray = GRID) -> np.ndarray:
    """The knobs of ``grid`` where the family's decoded plan changes (the first is 0): segment ``i``
    spans ``[out[i], out[i + 1])``. A family of bit widths has a few segments, a sparsity ~1,000."""
    starts, last = [], None
    for u in grid:
        plan = enc.decode(family(float(u)))
        if plan != last:
            starts.append(float(u))
            last = plan
    return np.array(starts)


def bisect_segments(knobs: np.ndarray, violation: np.ndarray, starts: np.ndarray) -> float | None:
    """The next knob of a bisection over the family's distinct plans (:func:`segments`): midway
    between the most compressing segment measured feasible and the least compressing infeasible one
    above it, at the middle of its segment; None once the two are neighbours (the edge is found)."""
    idx = np.searchsorted(starts, knobs, side="right") - 1
    feasible = violation <= 0
    lo = int(idx[feasible].max()) if feasible.any() else -1
    above = idx[(~feasible) & (idx > lo)]
    hi = int(above.min()) if above.size else len(starts)
    if hi - lo <= 1:
        return None
    mid = (lo + hi) // 2
    end = starts[mid + 1] if mid + 1 < len(starts) else 1.0
    return float((starts[mid] + end) / 2)


def knob_table(family: Callable[[float], np.ndarray], grid: np.ndarray = GRID) -> np.ndarray:
    """The family's plan at every grid knob (``len(grid) x d``): what :func:`knob_of` searches."""
    return np.stack([family(u) for u in grid])


def knob_of(
    points: np.ndarray, family: Callable[[float], np.ndarray], grid: np.ndarray = GRID, table: np.ndarray | None = None
) -> np.ndarray:
    """The knob value whose plan is nearest each point (the inverse of the family on its range);
    ``table``: :func:`knob_table` of the family on ``grid``, if already computed."""
    table = knob_table(family, grid) if table is None else table
    d2 = ((points[:, None, :] - table[None, :, :]) ** 2).sum(-1)
    return grid[np.argmin(d2, axis=1)]


def next_knob(
    u: np.ndarray,
    violation: np.ndarray,
    se: np.ndarray | None,
    *,
    start: float,
    pending: np.ndarray | None = None,
    failed: np.ndarray | None = None,
    judged: np.ndarray | None = None,
) -> float:
    """The level-set acquisition over the knob (larger knob = more compression); ``judged``: the
    violations its yes/no decisions read (``History.judged``), if not ``violation``."""
    if len(u) == 0:
        return start
    feasible = (violation if judged is None else judged) <= 0
    if len(u) < BISECT:
        # too few points for a GP: bisect between the largest feasible knob and the smallest
        # infeasible one above it (the first step from a feasible start goes halfway to the end)
        lo = float(u[feasible].max()) if feasible.any() else 0.0
        above = u[(~feasible) & (u > lo)]
        hi = float(above.min()) if above.size else 1.0
        return (lo + hi) / 2
    # clipped as the pick's model is: a plan at chance would otherwise set the scale of the edge
    model = fit_gp(u.reshape(-1, 1), clip_violation(violation, se), se)
    mean, std = posterior(model, GRID.reshape(-1, 1))
    p_feas = normal_cdf(-mean / std)
    best = float(u[feasible].max()) if feasible.any() else 0.0
    ceiling = clear_failure(u, violation, se, best)
    gain = np.maximum(GRID - best, 0.0) * p_feas
    taken = np.concatenate([u, *(a for a in (pending, failed) if a is not None)])
    near = np.min(np.abs(GRID[:, None] - taken[None, :]), axis=1) < 0.004
    shut = near | (ceiling <= GRID)
    gain[shut] = 0.0
    if gain.max() > 1e-3:
        return float(GRID[int(np.argmax(gain))])
    straddle = 1.96 * std - np.abs(mean)
    straddle[shut] = -np.inf
    if not np.isfinite(straddle).any():  # every open knob measured: halve the last gap
        return (best + min(ceiling, 1.0)) / 2
    return float(GRID[int(np.argmax(straddle))])


def clear_failure(u: np.ndarray, violation: np.ndarray, se: np.ndarray | None, best: float) -> float:
    """The smallest knob above ``best`` (the largest feasible one) whose plan broke the constraint
    by more than ``gp.clip_level(se)`` (3 standard errors), i.e. beyond noise; infinity if none, or if the noise
    is unknown.

    A family compresses every layer more as its knob grows, so a knob above a clear failure is not
    worth a trial. The GP does not know that: its mean falls back to the prior away from the data,
    and with the knob's gain growing to the end of the range the rule kept walking past a failure.
    Measured on ``bo``'s warm start at budget 100 (docs/search.md, "The warm start's knob"): on
    fmnist-resnet, after a plan 14.3x smaller lost 31 points, the rule's next four knobs gave plans
    30-74x smaller that lost 77-83 points (4 of the 8 warm-start trials); on fmnist-mobilenet, after
    14.8x had lost 82 points, it tried 28.9x (lost 82)."""
    level = clip_level(se)
    if level is None:
        return math.inf
    above = u[(violation > level) & (u > best)]
    return float(above.min()) if above.size else math.inf


class LevelSetSampler(PlanSampler):
    def __init__(self, context: SearchContext, family: Callable[[float], np.ndarray] | None = None) -> None:
        super().__init__(context)
        self.family = family or uniform_family(self.encoding)

    def start(self) -> float:
        """First knob: the largest at which the probe (no fine-tune) still meets the constraint,
        since fine-tuning only recovers; 0.5 without a probe."""
        return largest_feasible_knob(self.context, self.family, "levelset.start")

    def propose(self, history: History, study: optuna.Study) -> np.ndarray:
        table = knob_table(self.family)  # once for the three look-ups
        u = knob_of(history.x, self.family, table=table) if history.n else np.zeros(0)
        pending = knob_of(history.pending, self.family, table=table) if len(history.pending) else np.zeros(0)
        failed = knob_of(history.failed, self.family, table=table) if len(history.failed) else np.zeros(0)
        se = history.se if history.n and not np.isnan(history.se).any() else None
        knob = next_knob(
            u, history.violation, se, start=self.start(), pending=pending, failed=failed, judged=history.judged
        )
        return self.family(knob)


def sensitivity_family(context: SearchContext) -> Callable[[float], np.ndarray] | None:
    """The knob family from the sensitivity scan, or None without a probe."""
    scan = sensitivity_scan(context)
    return scan.family if scan is not None else None
