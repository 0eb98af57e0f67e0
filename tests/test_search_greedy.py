"""The sensitivity-greedy allocation baseline (search/greedy.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tightfit
from tightfit import ConfigError, Quantize
from tightfit.search.greedy import greedy_allocation


def test_greedy_compresses_the_tolerant_layer_first_and_meets_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1024)).eval()
    reference = model[0].weight.detach().clone()

    def evaluate(m):  # only the first layer matters: the second is free to compress
        return -float((m[0].weight.detach() - reference).pow(2).sum())

    full = tightfit.compress(model, evaluate=evaluate, strategy=Quantize(bits=8), budget=1).baseline_size_bytes
    limit = full // 4
    result = greedy_allocation(model, Quantize(bits=(2, 3, 4, 8)), evaluate, tightfit.MaxSize(limit))
    assert result.feasible and result.measurement.size_bytes <= limit
    bits = {layer: ops["quantize"]["bits"] for layer, ops in result.plan.layers.items()}
    assert bits["0"] == 8 and bits["2"] < 8  # the tolerant, large layer pays for the budget
    assert result.metric == -result.sensitivity["0/quantize/bits"][0][1]  # layer 0's loss at 8 bits only
    # one metric evaluation per dimension and level (4 bit widths x 2 layers) plus the answer
    assert result.evaluations == 2 * 4 + 1
    assert set(result.sensitivity) == {"0/quantize/bits", "2/quantize/bits"}


def test_greedy_refuses_a_non_resource_budget():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="budget_constraint"):
        greedy_allocation(model, Quantize(bits=(2, 8)), lambda m: 1.0, tightfit.MaxDrop(0.01))
    with pytest.raises(ConfigError, match="example_input"):
        greedy_allocation(model, Quantize(bits=(2, 8)), lambda m: 1.0, tightfit.MaxFlops(100))
