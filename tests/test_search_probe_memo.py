"""The sensitivity scan and the warm starts probe each distinct plan once per run: points of the
cube that decode to the same plan (a bit width's 3 choices over the scan's 11 levels) reuse the
first probe, and the scan reads exactly what probing every point would have read."""

from __future__ import annotations

import json

import numpy as np
from test_search_conformance import measure, synthetic_space

from tightfit.search.context import ProbeResult, SearchContext
from tightfit.search.encoding import UnitEncoding
from tightfit.search.sensitivity import LEVELS, sensitivity_scan, warm_start_point


def counting_context():
    space = synthetic_space()
    calls: list[str] = []

    def probe(plan) -> ProbeResult:
        calls.append(json.dumps(plan.to_dict(), sort_keys=True))
        objective, metric, constraint = measure(plan)
        return ProbeResult(metric, (constraint,), objective)

    return SearchContext(space=space, budget=10, probe=probe), calls


def test_scan_probes_each_plan_once_and_reads_the_same_values():
    context, calls = counting_context()
    scan = sensitivity_scan(context)
    assert len(calls) == len(set(calls))  # no plan probed twice
    enc = UnitEncoding(context.space)
    # the bit-width dimension: 11 levels, 3 choices, the gentlest (level 0.2) is the all-gentle plan
    assert len(calls) < 1 + enc.d * len(LEVELS)
    for i in range(enc.d):  # every entry is what a probe of that point measures
        for j, level in enumerate(LEVELS):
            x = np.zeros(enc.d)
            x[i] = level
            assert scan.violation[i, j] == measure(context.space.plan(enc.decode(x)))[2]
    assert scan.base == measure(context.space.plan(enc.decode(np.zeros(enc.d))))[2]
    # the warm start reuses the scan's probes too
    before = len(calls)
    warm_start_point(context, enc)
    assert len(calls) - before <= 20 and len(calls) == len(set(calls))


def test_a_deep_model_is_scanned_at_fewer_levels_per_dimension():
    # 122 dimensions at 11 levels were 1,343 probes (76 s of an 85 s run on a toy model)
    from tightfit.search.sensitivity import MAX_SCAN_PROBES, scan_levels

    assert np.array_equal(scan_levels(6), LEVELS) and np.array_equal(scan_levels(30), LEVELS)
    few = scan_levels(122)
    assert len(few) == 3 and few[-1] == 1.0 and set(few) <= set(LEVELS)
    assert 122 * len(few) <= MAX_SCAN_PROBES + 122 * 3 and len(scan_levels(40)) * 40 <= MAX_SCAN_PROBES
    assert np.all(np.diff(scan_levels(50)) > 0)
