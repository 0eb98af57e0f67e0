"""Several workers on one study in a real PostgreSQL server: `tightfit run --workers 2` plus a
separate `tightfit worker`; the separate worker is SIGKILLed in the middle of a trial, then the run
itself is SIGKILLed and started again. CI starts the server (.ci/postgres.sh) and sets
TIGHTFIT_TEST_POSTGRES_URL; without it this test is skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from tightfit.cli.app import app
from tightfit.scale.storage import with_installed_driver
from tightfit.search.loop import RETRY_OF, counted_trials

URL = os.environ.get("TIGHTFIT_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not URL, reason="TIGHTFIT_TEST_POSTGRES_URL is not set (CI sets it: `.ci/postgres.sh` starts PostgreSQL)"
    ),
]
PROJECT = Path(__file__).parent / "scale_project"
SRC = Path(__file__).resolve().parents[1] / "src"
BEATS = ["--heartbeat-interval", "1", "--grace-period", "2"]
N_PARAMS = 6  # 3 layers x (prune sparsity, quantize bits): a trial with all of them is evaluating


def _pid(trial) -> int | None:
    worker = trial.user_attrs.get("worker")
    return int(worker.rsplit(":", 1)[1]) if worker else None


def _wait_for(storage, study_name, condition, what, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
        except KeyError:
            trials = []
        found = condition(trials)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_mid_trial(storage, study_name, worker: subprocess.Popen) -> int:
    """SIGKILL ``worker`` while it evaluates a trial (its params all drawn); that trial's number."""
    killed = _wait_for(
        storage,
        study_name,
        lambda ts: next(
            (
                t.number
                for t in ts
                if t.state == TrialState.RUNNING and _pid(t) == worker.pid and len(t.params) == N_PARAMS
            ),
            None,
        ),
        "the separate worker to evaluate a trial",
    )
    worker.kill()
    worker.wait()
    return killed


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    """The process ended (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_workers_on_postgres_survive_sigkills(tmp_path):
    for name in ("scale_model.py", "scale.toml"):
        (tmp_path / name).write_text((PROJECT / name).read_text())
    config = tmp_path / "scale.toml"
    study_name = f"test-{uuid.uuid4().hex[:8]}"
    budget = 12
    text = config.read_text().replace("budget = 12", f"budget = {budget}").replace('study_name = "scale"', "")
    config.write_text(f'storage = "{URL}"\nstudy_name = "{study_name}"\n' + text)
    env = {**os.environ, "TIGHTFIT_TRIAL_SLEEP": "0.25", "PYTHONPATH": str(SRC)}
    python = [sys.executable, "-m", "tightfit.cli.app"]
    run_command = [*python, "run", str(config), "--workers", "2", *BEATS]
    run = subprocess.Popen(run_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lone = subprocess.Popen(
        [*python, "worker", str(config), *BEATS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    storage = optuna.storages.RDBStorage(with_installed_driver(URL))

    # 1. SIGKILL the separate worker in the middle of a trial: heartbeats stop, another retries it
    killed = _kill_mid_trial(storage, study_name, lone)

    # 2. the report reads the study while workers run
    shown = CliRunner().invoke(app, ["report", "--storage", URL, "--study", study_name])
    assert shown.exit_code == 0, shown.output
    assert "trials:" in shown.output and "running" in shown.output

    # 3. SIGKILL `tightfit run`: its local worker dies with it; starting it again finishes the budget
    pids = _wait_for(
        storage,
        study_name,
        lambda ts: (
            {_pid(t) for t in ts} - {None, lone.pid} if sum(t.state == TrialState.COMPLETE for t in ts) >= 4 else None
        ),
        "4 completed trials",
    )
    run.kill()
    run.wait()
    for pid in pids - {run.pid}:
        assert _gone(pid), f"worker {pid} outlived the `tightfit run` that started it"
    again = subprocess.run(run_command, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials()
    lost = trials[killed]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs
    retries = [t for t in trials if t.user_attrs.get(RETRY_OF) == killed]
    assert [t.state for t in retries] == [TrialState.COMPLETE] and retries[0].params == lost.params
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    lineage = [t.user_attrs.get(RETRY_OF, t.number) for t in complete]
    assert len(lineage) == len(set(lineage)), "a trial was completed twice"
    assert budget <= len(counted_trials(study)) <= budget + 2  # overshoot < number of processes
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    # the result is the best feasible trial in the storage
    summary = json.loads((tmp_path / "runs" / "scale" / "summary.json").read_text())
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    best = min(feasible, key=lambda t: (t.value, -t.user_attrs["measurement"]["metric"], t.number))
    assert summary["best_trial"] == best.number
    assert summary["trials"]["complete"] == len(complete)
    assert (tmp_path / "runs" / "scale" / "trials.csv").read_text().count("\n") == len(trials) + 1


_DIE_AFTER_STALE = '''"""Loaded at start-up (sitecustomize) by the processes of `tightfit run`: the first of them to
declare a trial stale is SIGKILLed after its FAIL is stored and before the retry is queued."""
import os
import signal
from pathlib import Path

from tightfit.scale import storage

_queue = storage.RetryStaleTrial.__call__


def _die_first(self, study, trial):
    marker = Path(os.environ["TIGHTFIT_TEST_DIE_MARKER"])
    try:
        with open(marker, "x") as handle:
            handle.write(str(os.getpid()))
    except FileExistsError:
        return _queue(self, study, trial)
    os.kill(os.getpid(), signal.SIGKILL)


storage.RetryStaleTrial.__call__ = _die_first
'''


@pytest.mark.slow
def test_a_worker_killed_between_failing_a_stale_trial_and_queueing_its_retry_loses_no_plan(tmp_path):
    # The flake of the test above, made certain: Optuna fails a stale trial and then runs the
    # callback that queues its retry, two transactions; its SIGKILLed `tightfit run` died between them
    # in 8 of 37 runs (the FAIL stored ~20 ms after the 4th trial's completion that triggers the kill).
    for name in ("scale_model.py", "scale.toml"):
        (tmp_path / name).write_text((PROJECT / name).read_text())
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_AFTER_STALE)
    config = tmp_path / "scale.toml"
    study_name = f"test-{uuid.uuid4().hex[:8]}"
    text = config.read_text().replace('study_name = "scale"', "")
    config.write_text(f'storage = "{URL}"\nstudy_name = "{study_name}"\n' + text)
    env = {**os.environ, "TIGHTFIT_TRIAL_SLEEP": "0.25", "PYTHONPATH": str(SRC)}
    marker = tmp_path / "died"
    hooked = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{SRC}", "TIGHTFIT_TEST_DIE_MARKER": str(marker)}
    python = [sys.executable, "-m", "tightfit.cli.app"]
    run_command = [*python, "run", str(config), "--workers", "2", *BEATS]
    run = subprocess.Popen(run_command, env=hooked, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lone = subprocess.Popen([*python, "worker", str(config), *BEATS], env=env, stdout=subprocess.DEVNULL)
    storage = optuna.storages.RDBStorage(with_installed_driver(URL))
    killed = _kill_mid_trial(storage, study_name, lone)
    # the process of `tightfit run` that declares the trial stale dies before it queues the retry;
    # if that is the run itself, its worker dies with it, and the run is started again
    _wait_for(storage, study_name, lambda ts: marker.exists() and ts[killed].state == TrialState.FAIL, "the FAIL")
    try:
        run.wait(timeout=180)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    again = subprocess.run(run_command, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    retries = [t for t in trials if t.user_attrs.get(RETRY_OF) == killed]
    assert [t.state for t in retries] == [TrialState.COMPLETE] and retries[0].params == trials[killed].params
    lineage = [t.user_attrs.get(RETRY_OF, t.number) for t in trials if t.state == TrialState.COMPLETE]
    assert len(lineage) == len(set(lineage)), "a trial was completed twice"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
