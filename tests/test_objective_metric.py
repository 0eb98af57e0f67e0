"""objective="metric": the most accurate plan within a resource budget (MaxSize, MaxBits, MaxFlops, MaxLatency)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tightfit
from tightfit import ConfigError, Quantize
from tightfit.evaluation import MaxBits, MaxFlops
from tightfit.export.artifact import load_model
from tightfit.records import Measurement
from tightfit.run.measuring import float32_file_bytes


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:384]), y[:384]).backward()
        opt.step()
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[384:], y[384:]), batch_size=128)
    return model.eval(), val


def test_most_accurate_plan_within_a_size_budget(tmp_path):
    model, val = _task()
    metric = tightfit.Accuracy(val)
    limit = float32_file_bytes(model) // 4
    result = tightfit.compress(
        model,
        evaluate=metric,
        strategy=Quantize(bits=(2, 8)),
        objective="metric",
        constraint=tightfit.MaxSize(limit),
        budget=8,
        run_dir=tmp_path / "run",
    )
    assert result.feasible and result.size_bytes <= limit
    feasible = [t for t in result.trials if t.feasible]
    assert len(feasible) < len([t for t in result.trials if t.state == "COMPLETE"])  # the budget binds
    best = max(t.measurement.metric for t in feasible)
    assert result.best_trial.measurement.metric == best
    smallest_at_best = min(t.measurement.size_bytes for t in feasible if t.measurement.metric == best)
    assert result.best_trial.measurement.size_bytes == smallest_at_best  # ties: the smaller file
    loaded = load_model(io.BytesIO(result.artifact), model)
    assert metric(loaded) == result.metric
    assert "within the budget" in result.message
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"objective": "metric"' in summary and '"bits_per_weight"' in summary


def test_objective_metric_is_refused_without_a_resource_budget():
    model, val = _task()
    calls = []

    def evaluate(m):
        calls.append(1)
        return 1.0

    for bad in (
        dict(objective="metric"),  # the default MaxDrop is not a resource: the original would win
        dict(objective="metric", constraint=tightfit.MaxDrop(0.01)),
        dict(objective="metric", constraint=tightfit.MaxSize(10_000), search="bo"),
        dict(constraint=MaxFlops(1e5)),  # FLOPs need an input
    ):
        with pytest.raises(ConfigError):
            tightfit.compress(model, evaluate=evaluate, strategy=Quantize(bits=(2, 8)), budget=2, **bad)
    assert not calls


def test_max_bits_and_max_flops_values():
    m = Measurement(metric=0.9, size_bytes=1000, nonzeros=500, weight_params=2000, flops=4000)
    assert m.bits_per_weight == 4.0
    assert MaxBits(4).value(m, m) == 0.0 and MaxBits(8).value(m, m) < 0 < MaxBits(2).value(m, m)
    assert MaxFlops(4000).value(m, m) == 0.0 and MaxFlops(2000).value(m, m) == 1.0
    assert m.objective("metric") == -0.9
    with pytest.raises(ConfigError):
        MaxBits(0)


def test_max_flops_budget_with_pruning():
    model, val = _task()
    x = next(iter(val))[0][:1]
    dense = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(val),
        strategy=tightfit.Prune(sparsity=(0.0, 0.9)),
        budget=1,
        example_input=x,
        constraint=tightfit.MaxSize(10**9),
    ).baseline.flops
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(val),
        strategy=tightfit.Prune(sparsity=(0.0, 0.9)),
        objective="metric",
        constraint=MaxFlops(dense / 2),
        example_input=x,
        budget=6,
    )
    assert result.feasible and result.best_trial.measurement.flops <= dense / 2
