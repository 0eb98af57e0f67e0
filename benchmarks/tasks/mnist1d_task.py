"""mnist1d, the cheap task (moved here from benchmarks/search_tasks.py): generated locally with
``mnist1d.data.make_dataset`` (no download), a 40-200-200-10 MLP trained in seconds."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

PIP_LINE = "pip install mnist1d"


def mnist1d_split(seed: int = 0):
    """5,000 generated samples: 4,000 split seeded 3,000 train / 1,000 validation (the remaining
    generated 1,000 are mnist1d's own test split)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(f"the mnist1d task needs the mnist1d package: {PIP_LINE}") from e
    from tightfit.demo.data import Split

    args = get_dataset_args()
    args.num_samples = 5000
    data = make_dataset(args)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(data["y"]))
    x, y = data["x"][perm].astype(np.float32), data["y"][perm].astype(np.int64)
    t = torch.from_numpy
    return Split(
        t(x[:3000]),
        t(y[:3000]),
        t(x[3000:]),
        t(y[3000:]),
        t(data["x_test"].astype(np.float32)),
        t(data["y_test"].astype(np.int64)),
    )


def mnist1d_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(40, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_task(seed: int = 0) -> dict[str, Any]:
    """Adam, lr 1e-3, batch 64, 60 epochs (tightfit.demo.train, as benchmarks/search_tasks.py)."""
    from tightfit.demo import train

    split = mnist1d_split(seed)
    torch.manual_seed(seed)
    start = time.time()
    model = train(mnist1d_mlp(), split, epochs=60, seed=seed)
    wall = time.time() - start
    return {
        "model": model,
        "settings": {"epochs": 60, "lr": 1e-3, "batch": 64, "seed": seed},
        "train_seconds": wall,
        "val_metric": accuracy(model, split.x_val, split.y_val),
        "test_metric": accuracy(model, split.x_test, split.y_test),
        "metric": "accuracy",
    }
