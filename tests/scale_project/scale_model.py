"""A tiny model whose trials cost milliseconds, for the multi-worker tests and benchmark.

The "teacher" labels are the untouched network's own predictions on fixed random inputs, so the
baseline metric is 1.0 and compression lowers it. ``TIGHTFIT_TRIAL_SLEEP`` (seconds) adds a fixed
sleep to every evaluation: a stand-in for fine-tuning that gives a killer time to hit mid-trial.
"""

import os
import time

import torch
from torch import nn

_INPUTS = torch.Generator().manual_seed(0)
X = torch.randn(256, 16, generator=_INPUTS)


def build(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))


_LABELS = build()(X).argmax(1).detach()


@torch.no_grad()
def agreement(model: nn.Module) -> float:
    delay = float(os.environ.get("TIGHTFIT_TRIAL_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    return float((model(X).argmax(1) == _LABELS).float().mean())
