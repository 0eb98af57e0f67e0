"""Issue 18: the budget bounds the probes (a run without fine-tuning probes at most
``probe_allowance(budget)`` distinct plans, the scan grouping neighbouring layers on a deep model),
``bo``'s first trials bisect the uniform family so its answer is at least as small as the best
uniform setting, and the run says how its wall time was spent."""

from __future__ import annotations

import json
import time

import numpy as np
import optuna
import pytest
import torch

import tightfit
from tightfit import Quantize, report
from tightfit.operators import Compose
from tightfit.operators.base import Hyperparameter
from tightfit.search import SearchSpace, run_trials
from tightfit.search.context import ProbeResult, SearchContext
from tightfit.search.encoding import UnitEncoding
from tightfit.search.levelset import bisect_segments, segments, uniform_family
from tightfit.search.loop import TrialOutcome, trial_constraints
from tightfit.search.sensitivity import distinct_probes, probe_allowance, scan_design
from tightfit.search.space import Dimension

BITS = (2, 3, 4, 8)
DEPTH = 16
#: what rounding to each bit width costs a layer (the metric lost, before its sensitivity)
ERROR = {8: 0.0, 4: 0.004, 3: 0.02, 2: 0.08}


def deep_space() -> SearchSpace:
    names = [f"l{i}" for i in range(DEPTH)]
    dims = tuple(Dimension(n, "quantize", Hyperparameter("bits", choices=BITS)) for n in names)
    return SearchSpace(Compose([Quantize(bits=BITS)]), dims, {n: {"quantize": {}} for n in names})


def measure(plan) -> tuple[float, float]:
    """(objective, constraint): bits summed over the layers; the deep layers are 4x as sensitive as
    the shallow ones; feasible while the metric lost stays under 0.5: uniform 4 bits loses 0.4
    (feasible), uniform 3 bits 2.0; a few shallow layers at 3 bits on top of 4 still fit."""
    bits = [plan.layers[f"l{i}"]["quantize"]["bits"] for i in range(DEPTH)]
    lost = sum(ERROR[b] * (1.0 if i < DEPTH // 2 else 4.0) for i, b in enumerate(bits))
    return float(sum(bits)), lost - 0.5


def counting_context(budget: int, max_probes: int | None) -> tuple[SearchContext, list[str]]:
    calls: list[str] = []

    def probe(plan) -> ProbeResult:
        calls.append(json.dumps(plan.to_dict(), sort_keys=True))
        objective, constraint = measure(plan)
        return ProbeResult(-constraint, (constraint,), objective)

    return SearchContext(space=deep_space(), budget=budget, probe=probe, max_probes=max_probes), calls


def evaluate(plan, trial) -> TrialOutcome:
    objective, constraint = measure(plan)
    return TrialOutcome(objective=objective, constraints=[constraint])


def run(method: str, budget: int, max_probes: int | None) -> tuple[optuna.Study, list[str]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    context, calls = counting_context(budget, max_probes)
    study = optuna.create_study()
    run_trials(study, context.space, evaluate, budget=budget, method=method, seed=0, context=context)
    return study, calls


def best_uniform() -> float:
    """The smallest objective of a feasible uniform setting, by trying each bit width."""
    space = deep_space()
    enc = UnitEncoding(space)
    feasible = []
    for b in BITS:
        plan = space.plan({k: b for k in enc.keys})
        objective, constraint = measure(plan)
        if constraint <= 0:
            feasible.append(objective)
    return min(feasible)


@pytest.mark.parametrize("budget", [12])
def test_probes_never_exceed_the_budgets_allowance(budget):
    allowance = probe_allowance(budget)
    study, calls = run("bo", budget, allowance)
    assert len(calls) == len(set(calls)) and 0 < len(calls) <= allowance
    # unbounded (fine-tuned runs), the same model gets its full per-layer scan: more than the bound
    _, unbounded = run("bo", budget, None)
    assert len(unbounded) > allowance


def test_a_deep_scan_groups_neighbouring_layers_to_fit():
    enc = UnitEncoding(deep_space())
    groups, levels = scan_design(enc, 12)
    assert 1 < len(groups) < DEPTH and distinct_probes(enc, groups, levels) <= 12
    assert sorted(np.concatenate(groups).tolist()) == list(range(DEPTH))  # every layer scanned once
    assert all(np.all(np.diff(g) == 1) for g in groups)  # runs of consecutive layers
    singles, _ = scan_design(enc, None)
    assert len(singles) == DEPTH
    assert scan_design(enc, 1) is None  # not even one group at two levels fits


def test_uniform_family_of_bit_widths_is_bisected_over_its_distinct_plans():
    enc = UnitEncoding(deep_space())
    family = uniform_family(enc)
    starts = segments(enc, family)
    assert len(starts) == len(BITS)  # 8, 4, 3, 2 bits for every layer
    widths = [enc.decode(family(float(u)))["l0/quantize/bits"] for u in starts]
    assert widths == [8, 4, 3, 2]
    knobs, viol = [], []
    while (knob := bisect_segments(np.array(knobs), np.array(viol), starts)) is not None:
        knobs.append(knob)
        viol.append(measure(deep_space().plan(enc.decode(family(knob))))[1])
    assert len(knobs) <= 3


def test_bos_answer_is_at_least_as_small_as_the_best_uniform_setting():
    floor = best_uniform()
    for budget in (12, 16):
        study, _ = run("bo", budget, probe_allowance(budget))
        feasible = [t.values[0] for t in study.trials if t.values and max(trial_constraints(t)) <= 0]
        assert feasible and min(feasible) <= floor, (budget, min(feasible), floor)
        level, _ = run("levelset", budget, probe_allowance(budget))
        uniform = [t.values[0] for t in level.trials if t.values and max(trial_constraints(t)) <= 0]
        assert min(feasible) <= min(uniform)


def test_a_run_without_fine_tuning_costs_budget_plus_allowance_and_says_where_time_went(
    mlp, digits, tmp_path, monkeypatch
):
    val = tightfit.Accuracy(digits.loader("val", 256))
    calls = {"n": 0}
    # the run files are written after the breakdown ends (0.15-0.2 s here, 0.7 s of a 3.3 s run on a
    # loaded machine): timed, and left out of the wall time the breakdown must cover
    writing = {"s": 0.0}
    write_run_files = report.write_run_files

    def timed_write(*args, **kwargs):
        started = time.perf_counter()
        try:
            return write_run_files(*args, **kwargs)
        finally:
            writing["s"] += time.perf_counter() - started

    monkeypatch.setattr(report, "write_run_files", timed_write)

    def evaluate_counted(model):
        calls["n"] += 1
        return val(model)

    budget = 12
    started = time.perf_counter()
    result = tightfit.compress(
        mlp,
        evaluate=evaluate_counted,
        strategy=Quantize(bits=(2, 3, 4, 8)),
        constraint=tightfit.MaxDrop(0.02),
        budget=budget,
        search="bo",
        seed=0,
        run_dir=tmp_path / "run",
    )
    wall = time.perf_counter() - started - writing["s"]
    # the original, the trials, the probes, the answer re-measured
    assert calls["n"] <= 1 + budget + probe_allowance(budget) + 1
    times = result.accounting["time"]
    parts = [v for k, v in times.items() if k != "total_s"]
    assert sum(parts) == pytest.approx(times["total_s"])
    assert all(times[k] >= 0 for k in times if k != "other_s")
    assert writing["s"] > 0  # the wrapper ran: the files were written and timed
    assert times["total_s"] <= wall and times["total_s"] >= 0.8 * wall
    assert times["evaluation_s"] > 0 and times["finetune_s"] == 0.0
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["accounting"]["time"]["probes_s"] == pytest.approx(times["probes_s"])


def test_with_fine_tuning_the_probes_stay_within_twice_the_budget(digits, tmp_path):
    """A 16-layer model (16 bit-width dimensions): its full scan is 1 + 16 x 3 distinct plans, more
    than the allowance; with fine-tuning the scan and the warm start still fit 2 x budget probes."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, 32), torch.nn.ReLU()]
    for _ in range(DEPTH - 2):
        layers += [torch.nn.Linear(32, 32), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 10))
    val = tightfit.Accuracy(digits.loader("val", 512))
    calls = {"evaluate": 0}

    def evaluate_counted(m):
        calls["evaluate"] += 1
        return val(m)

    budget = 4
    allowance = probe_allowance(budget, finetuned=True)
    assert allowance == 8 and 1 + DEPTH * (len(BITS) - 1) > allowance
    result = tightfit.compress(
        model,
        evaluate=evaluate_counted,
        strategy=Quantize(bits=BITS),
        constraint=tightfit.MaxDrop(0.02),
        finetune=tightfit.FineTune(digits.loader("train", batch_size=256), epochs=1, max_steps=1),
        budget=budget,
        search="bo",
        seed=0,
        run_dir=tmp_path / "run",
    )
    probes = calls["evaluate"] - 1 - len(result.trials) - 1  # the original, the trials, the answer re-measured
    assert 0 < probes <= allowance, (probes, allowance)
    assert result.accounting["time"]["finetune_s"] > 0
