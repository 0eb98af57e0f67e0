"""The metric search's local search after its warm start (``objective="metric"``): around the best
feasible trial so far, move one dimension one level gentler and (or) another one level harsher.

Candidates are ranked by the warm start's sensitivity table (the divergence each move adds or
removes, additively) among those whose estimated resources meet the budget; the best few are probed
on the calibration inputs (the whole plan: its file measured and its outputs' divergence), and the
one with the least divergence that meets the budget, measured, is proposed. Validation then judges
it, and the best trial moves. Proposals depend only on the finished trials and the (deterministic)
probes, so a resumed run proposes the same.

Why not TPE from the warm plans: on fmnist-mobilenet (52 bit-width dimensions) TPE's 28 trials after
them found nothing better, 13 of 28 over the budget (docs/calibration.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .loop import trial_constraints

if TYPE_CHECKING:
    from .warm_metric import Table

#: candidates probed per proposal (each one forward pass over the calibration samples and one file
#: measurement), the lowest estimated divergence first
PROBED_PER_PROPOSAL = 6

Levels = tuple[int, ...]


def neighbours(table: Table, at: Levels, weights: np.ndarray, slack: np.ndarray) -> list[tuple[float, Levels]]:
    """Moves from ``at`` (one level gentler, one harsher, or one of each in two dimensions) whose
    estimated resource change keeps ``slack`` (the measured constraint values of ``at``, <= 0 met)
    met, with their estimated divergence change, least first."""
    d = len(at)
    up: list[tuple[int, float, np.ndarray]] = [(-1, 0.0, np.zeros_like(slack))]
    down: list[tuple[int, float, np.ndarray]] = [(-1, 0.0, np.zeros_like(slack))]
    for i in range(d):
        j, div, res = at[i], table.divergence[i], table.resource[i]
        if j > 0:
            up.append((i, float(div[j - 1] - div[j]), res[j - 1] - res[j]))
        if j + 1 < len(div):
            down.append((i, float(div[j + 1] - div[j]), res[j + 1] - res[j]))
    out = []
    for i, dv_i, dr_i in up:
        for k, dv_k, dr_k in down:
            if i == k or (i < 0 and k < 0):
                continue
            if np.max((slack + dr_i + dr_k) * (weights > 0)) > 0:
                continue
            moved = list(at)
            if i >= 0:
                moved[i] -= 1
            if k >= 0:
                moved[k] += 1
            out.append((dv_i + dv_k, tuple(moved)))
    out.sort()
    return out


def propose(
    table: Table,
    incumbent: Levels,
    tried: set[Levels],
    probe: Callable[[Levels], tuple[float, np.ndarray]],
) -> Levels | None:
    """The next plan around ``incumbent`` (levels per dimension) not in ``tried``; None when no
    untried neighbour meets the budget. ``probe`` gives a plan's divergence and constraint values."""
    _, slack = probe(incumbent)
    weights = (table.base > 0).astype(float)
    best: tuple[float, Levels] | None = None
    probed = 0
    for _, moved in neighbours(table, incumbent, weights, slack):
        if moved in tried:
            continue
        divergence, constraints = probe(moved)
        probed += 1
        if np.max(constraints) <= 0 and (best is None or divergence < best[0]):
            best = (divergence, moved)
        if probed >= PROBED_PER_PROPOSAL and best is not None or probed >= 4 * PROBED_PER_PROPOSAL:
            break
    return None if best is None else best[1]


def incumbent_of(trials: list[Any], levels_of: Callable[[dict[str, Any]], Levels]) -> Levels | None:
    """The levels of the best feasible finished trial (the study minimizes; ties: the earliest)."""
    best = None
    for t in sorted(trials, key=lambda t: t.number):
        if t.values is None or any(v > 0 for v in trial_constraints(t)):
            continue
        if best is None or t.values[0] < best.values[0]:
            best = t
    return None if best is None else levels_of(best.params)
