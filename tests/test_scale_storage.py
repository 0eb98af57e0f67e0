"""Scale-out pieces that need no database server: storage options, budget counting over retried
trials, seeding by position (resume == uninterrupted), workers' arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import tightfit
from tightfit.errors import ConfigError
from tightfit.scale import open_storage, redact, work
from tightfit.search.loop import RETRY_OF, counted_trials, trial_position

PROJECT = Path(__file__).parent / "scale_project"
sys.path.insert(0, str(PROJECT))
import scale_model  # noqa: E402

compress = tightfit.compress


def _arguments(budget: int) -> dict:
    return dict(
        evaluate=scale_model.agreement,
        strategy=tightfit.Compose([tightfit.Prune(sparsity=(0.0, 0.9)), tightfit.Quantize(bits=(4, 8))]),
        constraint=tightfit.MaxDrop(0.3),
        budget=budget,
        search="tpe",
        seed=3,
    )


def test_open_storage_checks_heartbeat_settings_and_hides_the_password(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(ConfigError, match="grace_period"):
        open_storage(url, heartbeat_interval=5, grace_period=5)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        open_storage(url, heartbeat_interval=0)
    storage = open_storage(url, heartbeat_interval=1, grace_period=3)
    assert storage.get_heartbeat_interval() == 1
    assert redact("postgresql://u:secret@host:5432/db") == "postgresql://u:***@host:5432/db"
    with pytest.raises(ConfigError, match="cannot connect") as err:
        open_storage("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value)


def test_budget_does_not_count_trials_that_were_retried(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, value=1.0))
    broken = optuna.trial.create_trial(
        params={"x": 0.2}, distributions=dist, state=TrialState.FAIL, user_attrs={"error": "E"}
    )
    study.add_trial(broken)
    # a trial whose worker died: FAIL without an error, and a retry queued for it
    study.add_trial(optuna.trial.create_trial(params={"x": 0.3}, distributions=dist, state=TrialState.FAIL))
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.3}, distributions=dist, state=TrialState.WAITING, user_attrs={RETRY_OF: 2}
        )
    )
    assert [t.number for t in counted_trials(study)] == [0, 1]
    trials = study.get_trials()
    # the retry takes the dead trial's position; the next trial comes after both
    assert [trial_position(trials, n) for n in (2, 3, 4)] == [2, 2, 3]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    model = scale_model.build()
    budget = 6
    straight = compress(model, **_arguments(budget), run_dir=tmp_path / "straight")

    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C in the middle of the 5th evaluation
            raise KeyboardInterrupt
        return scale_model.agreement(m)

    with pytest.raises(KeyboardInterrupt):
        compress(model, **{**_arguments(budget), "evaluate": flaky}, run_dir=tmp_path / "resumed")
    resumed = compress(model, **_arguments(budget), run_dir=tmp_path / "resumed")

    def plans(result):
        return [t.plan.to_dict() for t in result.trials if t.state == "COMPLETE"]

    assert sum(t.state == "FAIL" for t in resumed.trials) == 1  # the interrupted one, retried
    assert len(plans(resumed)) == len(plans(straight)) == budget
    assert plans(resumed) == plans(straight)
    assert resumed.plan.to_dict() == straight.plan.to_dict()


def test_a_worker_needs_a_storage_and_the_studys_settings(tmp_path):
    model = scale_model.build()
    with pytest.raises(ConfigError, match="storage"):
        work(model, storage=None, **_arguments(2))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert work(model, storage=url, study_name="w", **_arguments(3)) == 3
    assert work(model, storage=url, study_name="w", **_arguments(3)) == 0  # budget already used
    with pytest.raises(ConfigError, match="seed"):
        work(model, storage=url, study_name="w", **{**_arguments(3), "seed": 4})
    study = optuna.load_study(study_name="w", storage=url)
    assert all(t.user_attrs["worker"].endswith(f":{__import__('os').getpid()}") for t in study.trials)
    torch.testing.assert_close(model(scale_model.X), scale_model.build()(scale_model.X))  # untouched


def test_run_files_are_refreshed_while_the_search_runs(tmp_path):
    seen = []

    def watching(m):
        csv = tmp_path / "run" / "trials.csv"
        seen.append(csv.read_text().count("\n") - 1 if csv.exists() else None)  # data rows so far
        return scale_model.agreement(m)

    compress(
        scale_model.build(), **{**_arguments(4), "evaluate": watching, "search": "random"}, run_dir=tmp_path / "run"
    )
    # call 1 measures the baseline, trials 0..3 each see the rows of those before them, and the
    # last call re-measures the chosen model once all 4 rows are written
    assert seen == [None, None, 1, 2, 3, 4]
    assert (tmp_path / "run" / "trials.png").exists()
