"""Tasks and the evaluation recipe of the search benchmark (issue 3), shared by every method.

Recipe (as ../shared/baselines/README.md): magnitude pruning of every Linear/Conv weight at
per-layer sparsities in [0, 0.999]; fine-tune with masks held (Adam, lr 3e-4, batch 64, 3 epochs,
the same shuffling every time); feasible when validation accuracy drops at most 0.5 points.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tightfit.demo import digits_split, lenet_300_100, train
from tightfit.demo.data import Split
from tightfit.demo.models import LeNet5

torch.set_num_threads(1)  # 2 shared cores: one thread per process, parallelize across processes
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks.tasks` importable
# mnist1d moved to benchmarks/tasks (issue 18)
from benchmarks.tasks.mnist1d_task import mnist1d_mlp, mnist1d_split  # noqa: E402

MAX_DROP = 0.005
FT_EPOCHS, FT_LR, BATCH = 3, 3e-4, 64


@dataclass
class Task:
    name: str
    model: nn.Module
    split: Split


_CACHE: dict[str, Task] = {}


def task(name: str) -> Task:
    if name in _CACHE:
        return _CACHE[name]
    torch.manual_seed(0)
    if name == "lenet300100":
        split = digits_split(0)
        model = train(lenet_300_100(), split, epochs=60, seed=0)
    elif name == "lenet5":
        split = digits_split(0)
        model = train(LeNet5(), split, epochs=100, seed=0)
    elif name == "mnist1d_mlp":
        split = mnist1d_split(0)
        model = train(mnist1d_mlp(), split, epochs=60, seed=0)
    else:
        raise KeyError(name)
    _CACHE[name] = Task(name, model.eval(), split)
    return _CACHE[name]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
