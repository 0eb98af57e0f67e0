"""compress(..., finetune=None, recover=FineTune(...)): search without training, then one recovery."""

from __future__ import annotations

import io
import json

import pytest

import tightfit
from tightfit import ConfigError, Prune
from tightfit.evaluation import MaxBits
from tightfit.export.artifact import load_model


def test_one_recovery_after_a_search_without_training(mlp, digits, tmp_path):
    metric = tightfit.Accuracy(digits.loader("val"))
    result = tightfit.compress(
        mlp,
        evaluate=metric,
        strategy=Prune(sparsity=(0.85, 0.97)),
        objective="metric",
        constraint=MaxBits(8),  # the pruned file's bits per weight: sparse storage needs high sparsity
        finetune=None,
        recover=tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3),
        recover_top=2,
        budget=3,
        search="random",
        run_dir=tmp_path / "run",
    )
    assert result.feasible
    searched = {t.number: t.measurement.metric for t in result.trials if t.feasible}
    assert len(result.recovery["trials"]) == min(2, len(searched))
    for row in result.recovery["trials"]:
        assert row["metric_before"] == searched[row["trial"]]
    chosen = result.best_trial.number
    assert result.recovery["chosen"] == chosen
    assert result.metric_before_recovery == searched[chosen]
    assert result.metric > result.metric_before_recovery  # fine-tuning repairs heavy pruning
    loaded = load_model(io.BytesIO(result.artifact), mlp)
    assert metric(loaded) == result.metric  # the file holds the recovered weights
    assert result.best_trial.measurement.metric == result.metric
    assert result.best_trial.measurement.bits_per_weight <= 8
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric_before_recovery"] == result.metric_before_recovery and summary["metric"] == result.metric
    assert any("Recovery after the search" in n for n in result.notes)


def test_recover_settings_are_checked_first(mlp):
    def evaluate(_):
        raise AssertionError("evaluated before the settings were checked")

    with pytest.raises(ConfigError, match="recover"):
        tightfit.compress(mlp, evaluate=evaluate, recover="yes", budget=1)
    with pytest.raises(ConfigError, match="recover_top"):
        tightfit.compress(mlp, evaluate=evaluate, recover=lambda m: None, recover_top=0, budget=1)
    with pytest.raises(ConfigError, match="recover_top"):
        tightfit.compress(mlp, evaluate=evaluate, recover_top=3, budget=1)
