"""FineTune's cosine schedule: the last steps move the weights far less than the first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError


def _step_sizes(schedule: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    seen: list[torch.Tensor] = []

    def loss(m: nn.Module, batch) -> torch.Tensor:
        seen.append(m.weight.detach().clone())  # the weights before each step
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    tune = tightfit.FineTune([(x, y)], epochs=10, lr=0.1, optimizer="sgd", momentum=0.0, loss=loss, schedule=schedule)
    tune(model)
    first = (seen[1] - seen[0]).norm().item()
    last = (model.weight.detach() - seen[-1]).norm().item()
    return first, last


def test_cosine_schedule_settles_the_weights_at_the_end():
    first, last = _step_sizes("cosine")
    assert last < 0.1 * first
    first, last = _step_sizes("constant")
    assert last > 0.3 * first


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="schedule"):
        tightfit.FineTune([(torch.zeros(1, 4), torch.zeros(1))], schedule="linear")
