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


@pytest.fixture(scope="session")
def trained_user_project(tmp_path_factory):
    """examples/user_project with trained weights, outside the tightfit package (trained once per
    session for the command-line tests; copy it before changing it)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "user_project"
    dest = tmp_path_factory.mktemp("template") / "proj"
    shutil.copytree(example, dest, ignore=shutil.ignore_patterns("runs", "weights.pt", "__pycache__"))
    subprocess.run(
        [sys.executable, "-c", "import my_models; my_models.train_weights('weights.pt', epochs=5)"],
        cwd=dest,
        check=True,
    )
    return dest
