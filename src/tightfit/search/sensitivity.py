"""The per-dimension sensitivity scan: each dimension pushed alone from its gentle end towards its
aggressive end, the plan probed without fine-tuning. From it, a one-knob family of plans that
compresses insensitive dimensions first (the low-dimensional parametrization the BO warm-starts on).
"""

from __future__ import annotations

import json
import time
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


def scan_levels(d: int) -> np.ndarray:
    """The levels each of ``d`` dimensions is probed at: all of LEVELS while ``d * 11`` probes fit
    MAX_SCAN_PROBES, else an evenly spread subset."""
    n = int(np.clip(MAX_SCAN_PROBES // max(d, 1), 3, len(LEVELS)))
    if n >= len(LEVELS):
        return LEVELS.copy()
    return LEVELS[np.unique(np.round(np.linspace(0, len(LEVELS) - 1, n)).astype(int))]


@dataclass(frozen=True)
class Sensitivity:
    """``violation[i, j]``: the probed constraint value with dimension ``i`` at ``levels[j]`` and all
    others at their gentle end; ``base``: the same with every dimension gentle."""

    levels: np.ndarray
    violation: np.ndarray
    base: float
    seconds: float

    def envelope(self) -> np.ndarray:
        """Running maximum along the levels, so a noisy curve never looks safer further out."""
        return np.maximum.accumulate(self.violation, axis=1)

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
    key = json.dumps(plan.to_dict(), sort_keys=True)
    if key not in cache:
        assert context.probe is not None, "probe_violation needs a search context with a probe"
        cache[key] = context.probe(plan).violation
    return cache[key]


def sensitivity_scan(context: SearchContext) -> Sensitivity | None:
    """Memoized per run (the probes are deterministic, so a resumed run scans the same)."""
    if context.probe is None:
        return None
    if "sensitivity" in context.memo:
        return context.memo["sensitivity"]
    enc = UnitEncoding(context.space)
    started = time.perf_counter()
    base = probe_violation(context, context.space.plan(enc.decode(np.zeros(enc.d))))
    levels = scan_levels(enc.d)
    viol = np.zeros((enc.d, len(levels)))
    for i in range(enc.d):
        for j, level in enumerate(levels):
            x = np.zeros(enc.d)
            x[i] = level
            viol[i, j] = probe_violation(context, context.space.plan(enc.decode(x)))
    result = Sensitivity(levels, viol, float(base), time.perf_counter() - started)
    context.memo["sensitivity"] = result
    return result


def warm_start_point(context: SearchContext, enc: UnitEncoding) -> np.ndarray:
    """A starting plan for local searches (MADS, OLMP): on the sensitivity family, the largest knob
    whose probe (no fine-tune) still meets the constraint, since fine-tuning only recovers; the
    middle of the cube without a probe."""
    scan = sensitivity_scan(context)
    if scan is None:
        return np.full(enc.d, 0.5)
    if "warm_start.knob" not in context.memo:
        ok = 0.0
        for u in np.linspace(0.05, 1.0, 20):
            if probe_violation(context, context.space.plan(enc.decode(scan.family(u)))) <= 0:
                ok = float(u)
            else:
                break
        context.memo["warm_start.knob"] = ok
    return scan.family(context.memo["warm_start.knob"])
