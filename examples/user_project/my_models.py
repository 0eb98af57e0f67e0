"""A user's own model and data, outside the tightfit package (used by the README and the tests)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallNet(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.body(x))


def build(hidden: int = 64) -> nn.Module:
    return SmallNet(hidden)


def _split():
    from tightfit.demo import digits_split

    return digits_split(0)


def val_loader():
    s = _split()
    return DataLoader(TensorDataset(s.x_val, s.y_val), batch_size=512)


def train_loader():
    s = _split()
    return DataLoader(TensorDataset(s.x_train, s.y_train), batch_size=64, shuffle=True)


def example_input():
    return _split().x_val[:1]


def train_weights(path: str, epochs: int = 15) -> None:
    """Train SmallNet briefly and save its state_dict (what a user would already have)."""
    from tightfit.demo import train

    torch.manual_seed(0)
    model = train(build(), _split(), epochs=epochs)
    torch.save(model.state_dict(), path)


if __name__ == "__main__":
    from pathlib import Path

    train_weights(str(Path(__file__).with_name("weights.pt")))  # beside tightfit.toml, wherever it is run from
