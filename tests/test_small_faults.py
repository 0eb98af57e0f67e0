"""Small faults found by trying tightfit as a new user would (issue 16, item 9), one test each."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

import tightfit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


def _fidelity(reference: nn.Module):
    with torch.no_grad():
        target = reference(X)

    def metric(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(X) - target).pow(2).mean())

    return metric


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in tightfit catches it, so the trial stays RUNNING."""


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_a_trial_killed_between_two_suggest_calls_is_retried_with_the_same_plan(search, tmp_path, monkeypatch):
    model = _model()
    args = dict(evaluate=_fidelity(model), budget=4, search=search, constraint=tightfit.MaxDrop(1.0), seed=0)
    whole = tightfit.compress(model, **args, run_dir=tmp_path / "whole")
    real = optuna.trial.Trial.suggest_float
    calls = {"n": 0}

    def killed_on_the_sixth_draw(self, *a, **k):  # trial 2, after its first layer's values (two floats a trial)
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Killed
        return real(self, *a, **k)

    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", killed_on_the_sixth_draw)
    with pytest.raises(_Killed):
        tightfit.compress(model, **args, run_dir=tmp_path / "split")
    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", real)
    resumed = tightfit.compress(model, **args, run_dir=tmp_path / "split")
    assert [t.error for t in resumed.trials].count("interrupted") == 1
    completed = [t.plan for t in resumed.trials if t.state == "COMPLETE"]
    assert completed == [t.plan for t in whole.trials]  # before: trial 2's second layer drew other values
