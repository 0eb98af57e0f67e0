"""Scale-out pieces that need no database server: storage options, budget counting over retried
trials, seeding by position (resume == uninterrupted), workers' arguments."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import tightfit
from tightfit.errors import ConfigError
from tightfit.operators.base import Hyperparameter
from tightfit.scale import open_storage, redact, work
from tightfit.scale.storage import requeue_lost_trials
from tightfit.search import SearchSpace, run_trials
from tightfit.search.loop import RETRY_OF, TrialOutcome, counted_trials, trial_position
from tightfit.search.space import Dimension

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


def _lost_trial_study(tmp_path, retries_queued: int, failed_ago: timedelta = timedelta(hours=1)):
    """A study on a heartbeat storage whose trial 0 was declared stale (FAIL, no error) ``failed_ago``
    by a worker that died before it queued the retry, or that ``retries_queued`` workers requeued."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    space = SearchSpace(
        tightfit.Compose([tightfit.Quantize(bits=(2, 3, 4, 8))]),
        tuple(Dimension(n, "quantize", Hyperparameter("bits", choices=(2, 3, 4, 8))) for n in ("a", "b")),
        {n: {"quantize": {}} for n in ("a", "b")},
    )
    plan = {"a/quantize/bits": 3, "b/quantize/bits": 2}
    dists = {k: optuna.distributions.CategoricalDistribution((2, 3, 4, 8)) for k in plan}
    dead = optuna.trial.create_trial(
        state=TrialState.FAIL, params=plan, distributions=dists, user_attrs={"worker": "h:1", "search_time_s": 0.1}
    )
    dead.datetime_start = datetime.now() - failed_ago - timedelta(seconds=5)
    dead.datetime_complete = datetime.now() - failed_ago
    study.add_trial(dead)
    for _ in range(retries_queued):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING, params=plan, distributions=dists, user_attrs={RETRY_OF: 0}
            )
        )
    return study, space, plan


@pytest.mark.parametrize("retries_queued", [0, 1, 2])
def test_a_stale_trial_is_evaluated_once_even_if_its_retry_was_lost_or_queued_twice(tmp_path, retries_queued):
    # 0: the failing worker died between FAIL and queueing (test_scale_postgres's flake: 8 of 36
    # studies the slow test left in PostgreSQL); 2: two workers requeued it at once
    study, space, plan = _lost_trial_study(tmp_path, retries_queued)
    evaluated = []

    def evaluate(p, trial):
        evaluated.append((trial.number, dict(trial.params), trial.user_attrs.get(RETRY_OF)))
        return TrialOutcome(objective=float(trial.number), constraints=[-1.0])

    run_trials(study, space, evaluate, budget=3, method="random", seed=0)
    again = [(params, of) for _, params, of in evaluated if of == 0]
    assert again == [(plan, 0)], evaluated  # trial 0's plan, evaluated once, as its retry
    assert len(evaluated) == 3 and len(counted_trials(study)) == 3
    trials = study.get_trials()
    assert requeue_lost_trials(study, settle_s=0.0) == 0  # nothing left to repair, no retry of a dropped duplicate
    assert [t.state for t in trials if t.user_attrs.get(RETRY_OF) == 0][1:] == [TrialState.FAIL] * max(
        0, retries_queued - 1
    )


def test_a_fresh_trial_does_not_take_the_place_of_a_trial_whose_retry_is_not_queued_yet(tmp_path):
    # trial 0 failed a moment ago and its retry is not queued yet (its worker may still queue it,
    # or died): the last place of the budget is its retry's, queued after the grace period (2 s)
    study, space, plan = _lost_trial_study(tmp_path, 0, failed_ago=timedelta(0))
    evaluated = []

    def evaluate(p, trial):
        evaluated.append((dict(trial.params), trial.user_attrs.get(RETRY_OF)))
        return TrialOutcome(objective=1.0, constraints=[-1.0])

    run_trials(study, space, evaluate, budget=1, method="random", seed=0, poll_s=0.05)
    assert evaluated == [(plan, 0)]


def test_only_trials_failed_by_another_process_without_a_retry_are_requeued(tmp_path):
    study, _, plan = _lost_trial_study(tmp_path, 0)
    dists = study.trials[0].distributions
    old = datetime.now() - timedelta(hours=1)

    def add(state=TrialState.FAIL, **user_attrs):
        t = optuna.trial.create_trial(state=state, params=plan, distributions=dists, user_attrs=user_attrs)
        t.datetime_start, t.datetime_complete = old, old if state == TrialState.FAIL else None
        study.add_trial(t)

    add(error="ValueError: x", duration_s=1.0)  # 1: the evaluation failed: counted, never retried
    add(duration_s=1.0)  # 2: its own worker told it (Optuna fails a NaN objective): not lost
    add(interrupted=True, search_time_s=0.1)  # 3: Ctrl-C, and its retry not queued (a second Ctrl-C): lost
    add(interrupted=True)  # 4: Ctrl-C, retry queued as 5
    add(TrialState.WAITING, retry_of=4)
    fresh = optuna.trial.create_trial(state=TrialState.FAIL, params=plan, distributions=dists)
    study.add_trial(fresh)  # 6: failed just now: its worker may be queueing the retry this moment
    assert requeue_lost_trials(study, settle_s=2.0) == 2  # trials 0 and 3
    retries = {t.user_attrs[RETRY_OF]: t for t in study.get_trials() if t.number > 6}
    assert sorted(retries) == [0, 3] and all(t.params == plan for t in retries.values())
    assert retries[0].system_attrs["retry_history"] == [0]
    assert requeue_lost_trials(study, settle_s=2.0) == 0  # once
    # max_retry counts the lineage: a trial that went stale max_retry times is not queued again
    storage = open_storage(f"sqlite:///{tmp_path / 'm.db'}", heartbeat_interval=1, grace_period=2, max_retry=1)
    limited = optuna.create_study(storage=storage)
    third = optuna.trial.create_trial(state=TrialState.FAIL, system_attrs={"retry_history": [0]})
    third.datetime_complete = old
    limited.add_trial(third)
    assert requeue_lost_trials(limited, settle_s=2.0) == 0


def test_a_second_ctrl_c_while_the_interrupted_trial_is_requeued_loses_no_plan(tmp_path, monkeypatch):
    model = scale_model.build()
    budget = 3
    straight = compress(model, **_arguments(budget), run_dir=tmp_path / "straight")
    calls = {"n": 0}

    def interrupted(m):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of the 2nd trial (call 1 measures the original)...
            raise KeyboardInterrupt
        return scale_model.agreement(m)

    def second_ctrl_c(self, *args, **kwargs):  # ...and again after the trial was failed, before its retry
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(optuna.Study, "enqueue_trial", second_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            compress(model, **{**_arguments(budget), "evaluate": interrupted}, run_dir=tmp_path / "resumed")
    resumed = compress(model, **_arguments(budget), run_dir=tmp_path / "resumed")

    def plans(result):
        return [t.plan.to_dict() for t in result.trials if t.state == "COMPLETE"]

    assert plans(resumed) == plans(straight)  # the interrupted plan was evaluated on resume, in its place
