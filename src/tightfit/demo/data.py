"""scikit-learn's digits (ships with the package; no download): a fixed, seeded, stratified
60/20/20 split into train, validation (search decisions) and test (never seen by the search)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def loader(self, part: str, batch_size: int = 64, shuffle: bool = False) -> DataLoader:
        x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def digits_split(seed: int = 0) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    n_part = round(0.2 * len(y))  # 360 of 1797
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=n_part, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_part, stratify=y_rest, random_state=seed
    )
    t = torch.from_numpy
    return Split(t(x_train), t(y_train), t(x_val), t(y_val), t(x_test), t(y_test))


def train(
    model: torch.nn.Module, split: Split, *, epochs: int = 60, lr: float = 1e-3, seed: int = 0
) -> torch.nn.Module:
    """Train with Adam on the training part (the protocol of ../shared/baselines)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loader = split.loader("train", shuffle=True)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return model.eval()
