"""Latency timed against a reference: the ratio holds while the machine's load changes."""

from __future__ import annotations

import torch
from torch import nn

import tightfit
from tightfit.measure import latency as latency_module
from tightfit.measure.latency import Latency, LatencyResult


class _Machine:
    """A simulated clock on a machine whose load triples for 0.1 s out of every 0.2 s, for every
    model alike: a call of ``cost`` seconds advances the clock by ``cost`` times the load."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def model(self, cost: float):
        def call() -> None:
            self.now += cost * (3.0 if int(self.now / 0.1) % 2 else 1.0)

        return call


def test_time_against_reports_the_ratio_to_the_reference_under_a_changing_load(monkeypatch):
    machine = _Machine()
    monkeypatch.setattr(latency_module, "clock", machine.clock)
    meter = Latency(torch.zeros(1, 2), threads=1, min_run_time=0.3, warmup=1)
    reference = LatencyResult(median_ms=10.0, iqr_ms=0.0, runs=1, blocks=1, batch_size=None, threads=1)
    result = meter.time_against(machine.model(0.004), machine.model(0.002), reference)
    # twice the reference's time, 20 ms on the reference's scale, whatever the load did meanwhile
    assert 19.0 < result.median_ms < 21.0, result
    assert result.blocks >= 5


def test_a_run_times_its_trials_against_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 16)
    meter = Latency(x, threads=1, min_run_time=0.01)
    result = tightfit.compress(
        model,
        evaluate=lambda m: 1.0,
        strategy=tightfit.StructuredPrune(ratio=(0.0, 0.5)),
        objective="latency",
        constraint=tightfit.MaxDrop(0.5),
        example_input=x,
        latency=meter,
        budget=3,
        search="random",
    )
    assert meter.reference is not None
    assert meter.reference.median_ms == result.baseline.latency_ms
    assert all(t.measurement.latency_ms > 0 for t in result.trials)
