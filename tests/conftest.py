"""Shared fixtures: tiny models and scikit-learn's digits, trained once per session."""

from __future__ import annotations

import pytest
import torch

from tightfit.demo import digits_split, lenet_300_100, train


@pytest.fixture(scope="session")
def digits():
    return digits_split(0)


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """LeNet-300-100 trained briefly: accurate enough (~95%) for searches to mean something."""
    torch.manual_seed(0)
    return train(lenet_300_100(), digits, epochs=8, seed=0)


@pytest.fixture
def mlp(trained_mlp):
    import copy

    return copy.deepcopy(trained_mlp)
