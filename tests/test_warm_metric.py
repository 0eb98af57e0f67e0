"""objective="metric"'s warm start (tightfit.search.warm_metric): sensitivities on the calibration
inputs, an allocation at the budget, its plans as the first trials."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from torch import nn

import tightfit
from tightfit import Quantize
from tightfit.evaluation.divergence import OutputDivergence, first_samples
from tightfit.measure.analysis import analyze
from tightfit.operators.compose import as_strategy
from tightfit.run.measuring import float32_file_bytes
from tightfit.search.encoding import UnitEncoding
from tightfit.search.space import build_space
from tightfit.search.swap import neighbours, propose
from tightfit.search.warm_metric import WARM_ATTR, Table, fill_measured, levels_of, probed_levels


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(640, 64, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:384]), y[:384]).backward()
        opt.step()
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[384:512], y[384:512]), batch_size=128)
    calibration = [x[512:576], x[576:640]]  # inputs only, apart from the validation samples
    return model.eval(), val, calibration


class _Counting:
    """The validation metric, recording every model it scores."""

    def __init__(self, val):
        self.metric = tightfit.Accuracy(val)
        self.calls = 0

    def __call__(self, model):
        self.calls += 1
        return self.metric(model)


def _study(path):
    return optuna.load_study(study_name="tightfit", storage=f"sqlite:///{path / 'study.db'}")


def _compress(model, evaluate, calibration, budget=5, **kw):
    return tightfit.compress(
        model,
        evaluate=evaluate,
        strategy=Quantize(bits=(2, 3, 4, 8)),
        objective="metric",
        constraint=tightfit.MaxSize(float32_file_bytes(model) // 6),
        budget=budget,
        calibration=calibration,
        progress=False,
        **kw,
    )


def test_divergence_is_zero_for_the_original_and_grows_with_rounding():
    model, _, calibration = _task()
    div = OutputDivergence(model, calibration, samples=100)
    assert div.samples == 100 and [len(b) for b in div.batches] == [64, 36]
    assert div(model) == pytest.approx(0.0, abs=1e-9)
    coarse = tightfit.compress_once(model, Quantize(2)).model
    fine = tightfit.compress_once(model, Quantize(8)).model
    assert div(coarse) > div(fine) > 0
    assert div.calls == 3
    assert [len(b) for b in first_samples(calibration, 10)] == [10]


def test_probed_levels_are_bounded_and_keep_the_hardest():
    assert probed_levels(4, 3) == [1, 2, 3]
    few = probed_levels(6, 300)  # 400 probes over 300 numeric dimensions: 2 levels each
    assert len(few) == 2 and few[-1] == 5
    # a bit width is a choice: every one probed, however many layers (5 bits was never chosen when
    # interpolated between 4 and 6)
    assert probed_levels(6, 300, choice=True) == [1, 2, 3, 4, 5]


def _table(d=4, levels=4):
    """Dimension i at level j: divergence (i + 1) * j^2, resource -10 * j (all-gentle is 25 over)."""
    div = [np.array([(i + 1) * j * j for j in range(levels)], dtype=float) for i in range(d)]
    res = [np.array([[-10.0 * j] for j in range(levels)]) for _ in range(d)]
    return Table(div, res, np.array([25.0]), 0)


def test_measured_fill_spends_the_budget_and_never_misses_it():
    table = _table()
    calls = []

    def measured(at):  # the file: the sum, plus 3 bytes whenever dimension 0 is gentlest (not additive)
        calls.append(list(at))
        return np.array([25.0 - 10 * sum(at) + (3.0 if at[0] == 0 else 0.0)])

    filled = fill_measured(table, [3, 3, 3, 3], np.array([1.0]), measured, limit=20)
    assert measured(filled)[0] <= 0
    assert sum(filled) == 3  # 5 levels gentler would be within the budget only by the additive estimate
    assert all(measured([*filled[:i], filled[i] - 1, *filled[i + 1 :]])[0] > 0 for i in range(4) if filled[i])
    assert fill_measured(table, [3, 3, 3, 3], np.array([1.0]), measured, limit=1) != [3, 3, 3, 3]


def test_local_search_proposes_untried_swaps_that_meet_the_budget():
    table = _table()
    at = (1, 1, 1, 0)  # -5: within the budget
    moves = neighbours(table, at, np.array([1.0]), np.array([-5.0]))
    assert moves and all(25 - 10 * sum(m) <= 0 for _, m in moves)
    assert all(sum(abs(a - b) for a, b in zip(m, at)) <= 2 for _, m in moves)
    assert [dv for dv, _ in moves] == sorted(dv for dv, _ in moves)

    def probe(levels):
        return float(sum((i + 1) * j * j for i, j in enumerate(levels))), np.array([25.0 - 10 * sum(levels)])

    first = propose(table, at, {at}, probe)
    assert first is not None and first != at and probe(first)[1][0] <= 0
    everything = {m for _, m in moves} | {at}
    assert propose(table, at, everything, probe) is None


def test_first_trials_are_the_warm_plans_and_probes_never_read_the_validation_data(tmp_path):
    model, val, calibration = _task()
    evaluate = _Counting(val)
    result = _compress(model, evaluate, calibration, run_dir=tmp_path / "run")
    plain = _Counting(val)
    _compress(model, plain, calibration, search="tpe")
    # the validation metric scores what it scores without the warm start (the original, each trial,
    # the answer): the probes read the calibration inputs only
    assert evaluate.calls == plain.calls == 1 + 5 + 1
    assert result.trials[0].probe_s > 0 and result.trials[0].probe_samples in (0, None)
    study = _study(tmp_path / "run")
    warm = study.user_attrs[WARM_ATTR]
    assert warm["probes"] > 3 * 3 and warm["samples"] == 64 and warm["seconds"] > 0
    assert 1 <= len(warm["params"]) <= 3
    for t, params in zip(sorted(study.trials, key=lambda t: t.number), warm["params"]):
        assert t.params == params
        assert max(t.constraints.values()) <= 0  # every warm plan meets the budget, measured
    assert result.feasible


def test_resume_gives_the_same_trials_and_the_local_search_steps_from_the_best(tmp_path):
    model, val, calibration = _task()
    first = _compress(model, tightfit.Accuracy(val), calibration, budget=7, run_dir=tmp_path / "a", seed=3)
    part = _compress(model, tightfit.Accuracy(val), calibration, budget=4, run_dir=tmp_path / "b", seed=3)
    assert [t.plan for t in part.trials] == [t.plan for t in first.trials[:4]]
    resumed = _compress(model, tightfit.Accuracy(val), calibration, budget=7, run_dir=tmp_path / "b", seed=3)
    assert [t.plan for t in resumed.trials] == [t.plan for t in first.trials]
    # after the warm plans: distinct plans within the budget, each two moves at most from a trial before it
    study = _study(tmp_path / "a")
    trials = sorted(study.trials, key=lambda t: t.number)
    n_warm = len(study.user_attrs[WARM_ATTR]["params"])
    enc = UnitEncoding(build_space(as_strategy(Quantize(bits=(2, 3, 4, 8))), analyze(model)))
    levels = [levels_of(enc, t.params) for t in trials]
    assert len(set(levels)) == len(levels)
    for k in range(n_warm, len(trials)):
        assert max(trials[k].constraints.values()) <= 0
        assert min(sum(abs(a - b) for a, b in zip(levels[k], levels[m])) for m in range(k)) <= 2


def test_without_calibration_the_search_is_plain_tpe(tmp_path):
    model, val, _ = _task()
    _compress(model, tightfit.Accuracy(val), None, budget=3, run_dir=tmp_path / "run")
    study = _study(tmp_path / "run")
    assert WARM_ATTR not in study.user_attrs
