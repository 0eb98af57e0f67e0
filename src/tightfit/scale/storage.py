"""Where a study lives when several processes share it: an Optuna RDB storage with heartbeats.

Every running trial's worker records a heartbeat every ``heartbeat_interval`` seconds (a thread,
:func:`trial_heartbeat`). A trial whose heartbeat is older than ``grace_period`` belongs to a dead
worker (SIGKILL, lost machine): :func:`optuna.storages.fail_stale_trials`, which every worker calls
before it asks for a trial, marks it FAIL and :class:`RetryStaleTrial` queues its parameters again,
so another worker evaluates it and the budget does not count it.

Failing a trial and queueing its retry are two transactions. A process that dies between them (a
worker that had just declared a trial stale, killed with its `tightfit run`; a second Ctrl-C while
an interrupted trial is re-queued) leaves a FAIL trial with no retry, which nothing would look at
again: fresh trials took its place and its plan was lost. :func:`requeue_lost_trials` finds those
and queues their retry; every worker runs it with the stale check.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError
from ..optuna_compat import heartbeat_of, storage_backend, study_storage, trial_id
from ..run_dir import DURATION_ATTR, ERROR_ATTR, INTERRUPTED_ATTR, SEARCH_TIME_ATTR, WORKER_ATTR
from ..run_dir import RETRY_OF_ATTR as RETRY_OF

log = logging.getLogger("tightfit")

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60
# RETRY_OF: user attr of a queued retry, the number of the trial it replaces; WORKER_ATTR: user attr
# "host:pid" of the process evaluating a trial, set after its first heartbeat


def plan_drawn(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether ``trial`` drew its whole plan (the loop stores ``search_time_s`` after the last
    ``suggest``). A retry of one stopped earlier fixes none of its values: with only the first few
    fixed it drew different values for the rest (the sampler's random stream is consumed per draw,
    and fixed values draw nothing); with none fixed it draws the whole plan again from the same
    seed, as the original did."""
    return SEARCH_TIME_ATTR in trial.user_attrs


class RetryStaleTrial:
    """Heartbeat-stale callback: queue the stale trial's parameters as a WAITING trial.

    Like Optuna's ``RetryHeartbeatStaleTrialCallback`` (same ``failed_trial`` / ``retry_history``
    system attrs), but it does not copy the stale trial's user attrs: a worker killed while it was
    writing its results must not leave half of them on the retry.
    """

    def __init__(self, max_retry: int | None = 3) -> None:
        self.max_retry = max_retry

    def allows(self, trial: FrozenTrial) -> bool:
        """Whether ``trial`` may be retried once more (``max_retry`` counts a trial's whole lineage)."""
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        return self.max_retry is None or len(history) <= self.max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.allows(trial):
            log.warning("trial %d went stale too often; not retrying it again", trial.number)
            return
        log.warning("trial %d lost its worker (no heartbeat); queued again", trial.number)
        queue_retry(study, trial)


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a WAITING retry of ``trial``: its parameters once its plan was drawn (:func:`plan_drawn`),
    none otherwise; ``retry_of`` names it, ``retry_history`` lists the lineage."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    drawn = plan_drawn(trial)
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params if drawn else {},
            distributions=trial.distributions if drawn else {},
            user_attrs={RETRY_OF: trial.number},
            system_attrs={"failed_trial": history[0], "retry_history": history},
        )
    )


def retry_parent(trial: FrozenTrial) -> int | None:
    """The number of the trial ``trial`` retries (ours name it in ``retry_of``; Optuna's retry
    callbacks put it last in ``retry_history``), or None for a trial of its own."""
    parent = trial.user_attrs.get(RETRY_OF)
    if parent is None:
        history = trial.system_attrs.get("retry_history")
        parent = history[-1] if history else None
    return parent


def duplicate_retries(trials: list[FrozenTrial]) -> set[int]:
    """Retries of a trial that already had one (two workers repaired one lost trial at once): only
    the first retry of each trial counts; the others are dropped when a worker draws them."""
    first: dict[int, int] = {}
    duplicates = set()
    for t in sorted(trials, key=lambda t: t.number):
        parent = retry_parent(t)
        if parent is None:
            continue
        if parent in first:
            duplicates.add(t.number)
        else:
            first[parent] = t.number
    return duplicates


def lost_trials(study: optuna.Study, trials: list[FrozenTrial], settle_s: float | None = None) -> list[FrozenTrial]:
    """FAIL trials of ``study`` (``trials``, as just read) that should have a retry, have none, and
    will get one from :func:`requeue_lost_trials`; only those failed over ``settle_s`` seconds ago
    if given (the process that failed a trial gets that long to queue its retry itself).

    Should have one: failed by another process (heartbeat-stale: no error and no ``duration_s``, which
    the loop writes before it tells any trial it evaluated) or interrupted. Not an evaluation's own
    failure (``error``; nor an objective Optuna refused, e.g. NaN, which has ``duration_s``), nor a
    dropped duplicate retry. A stale trial gets one only if the storage's stale callback is a
    :class:`RetryStaleTrial` that allows it (``max_retry``); an interrupted one always, as the loop does."""
    heartbeat = heartbeat_of(study_storage(study))
    callback = heartbeat.get_heartbeat_stale_trial_callback() if heartbeat is not None else None
    failed_before = datetime.now() - timedelta(seconds=settle_s) if settle_s is not None else datetime.max
    retried = {retry_parent(t) for t in trials} - {None}
    duplicates = duplicate_retries(trials)
    lost = []
    for t in trials:
        attrs = t.user_attrs
        if t.state != TrialState.FAIL or t.number in retried or t.number in duplicates or ERROR_ATTR in attrs:
            continue
        if t.datetime_complete is None or t.datetime_complete > failed_before:
            continue
        stale = DURATION_ATTR not in attrs and isinstance(callback, RetryStaleTrial) and callback.allows(t)
        if attrs.get(INTERRUPTED_ATTR) or stale:
            lost.append(t)
    return lost


def requeue_lost_trials(study: optuna.Study, settle_s: float) -> int:
    """Queue a retry for each lost trial (:func:`lost_trials`) failed over ``settle_s`` seconds ago;
    returns how many."""
    queued = 0
    for t in lost_trials(study, study.get_trials(deepcopy=False), settle_s):
        log.warning("trial %d failed without a retry (its process died in between); queued again", t.number)
        queue_retry(study, t)
        queued += 1
    return queued


def open_storage(
    url: str,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    grace_period: int | None = GRACE_PERIOD_S,
    max_retry: int | None = 3,
) -> RDBStorage:
    """An Optuna RDB storage (``postgresql://…``, ``mysql://…``, ``sqlite:///…``) with heartbeats on
    running trials and stale trials retried. ``grace_period`` should be several heartbeats long: a
    worker silent for longer is taken for dead and its trial is evaluated again elsewhere."""
    if not isinstance(heartbeat_interval, int) or heartbeat_interval < 1:
        raise ConfigError(
            f"`heartbeat_interval` must be a whole number of seconds >= 1, but got {heartbeat_interval!r}."
        )
    if grace_period is not None and (not isinstance(grace_period, int) or grace_period <= heartbeat_interval):
        raise ConfigError(
            f"`grace_period` must be a whole number of seconds > heartbeat_interval ({heartbeat_interval}), "
            f"but got {grace_period!r}."
        )
    check_sqlite_study(url)
    url = with_installed_driver(url)
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        # Several local processes on one SQLite file wait for its write lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        # see _flush_only_when_it_matters: writes do not wait for the disk, except a trial's end
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"options": "-c synchronous_commit=off"}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryStaleTrial(max_retry),
            )
        except ImportError as exc:
            raise ConfigError(f"storage {redact(url)}: the database driver is missing ({exc}).") from None
        except Exception as exc:
            raise ConfigError(
                f"storage {redact(url)}: cannot connect ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                "Check the URL, that the server runs and accepts this user."
            ) from None
    _flush_only_when_it_matters(storage)
    return storage


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (None for other URLs and in-memory databases)."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :].split("?", 1)[0]
            return Path(rest) if rest and rest != ":memory:" else None
    return None


def check_sqlite_study(url: str) -> None:
    """Refuse a damaged SQLite study before Optuna opens it: Optuna takes a 0-byte file for a new,
    empty study (a rerun would start over and overwrite the run's model and summary) and fails on
    any other damage with an uncaught ``DatabaseError``. Reads only; changes nothing."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    problem = study_file_problem(path)
    if problem is None:
        return
    from ..run_dir import RUN_FILES

    others = sorted(name for name in RUN_FILES if (path.parent / name).exists())
    if problem == "is empty (0 bytes)" and not others:
        return  # a run killed while SQLite created the file: nothing to lose, start the study
    kept = f" (the directory also holds {', '.join(others)})" if others else ""
    raise ConfigError(
        f"The study file {str(path)!r} {problem}{kept}; tightfit will not replace it, so nothing was changed. "
        f"Restore {path.name} from a backup, or move the directory {str(path.parent)!r} away (to keep its files) "
        "and run again to start a new search."
    )


def study_file_problem(path: Path) -> str | None:
    """What is wrong with a SQLite study file, or None if SQLite can read all of it."""
    import sqlite3

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return "is empty (0 bytes)"
    if head != SQLITE_HEADER:
        return "is not a SQLite database"
    try:
        # mode=rw: never creates the file; a hot journal (a writer killed mid-transaction) is rolled back
        # as Optuna's own connection would. quick_check reads every page: a few ms for a study of MBs.
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=60)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # another process is writing it: it is being used, not damaged
        return f"cannot be read by SQLite ({exc})"
    except sqlite3.DatabaseError as exc:
        return f"is damaged ({exc})"
    if rows != [("ok",)]:
        return f"is damaged (SQLite's check: {'; '.join(str(r[0]) for r in rows[:3])})"
    return None


_durable = threading.local()
# Writes after which the storage must survive a database crash: a trial's end, the study's setup.
_DURABLE_WRITES = ("set_trial_state_values", "create_new_study", "set_study_user_attr", "set_study_system_attr")


def _flush_only_when_it_matters(storage: RDBStorage) -> None:
    """On PostgreSQL, commit a running trial's own writes (parameters, attributes, heartbeats)
    without waiting for the disk flush, and flush when the trial ends. WAL is sequential, so the
    flushing commit of ``tell`` makes the trial's earlier writes durable too; a database crash
    before it loses at most a running trial, which is retried like one whose worker died. This
    takes one fsync per trial instead of about fifteen (each ~5 ms on this machine's disk).
    """
    import sqlalchemy

    if storage.engine.dialect.name != "postgresql":
        return

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin(connection: Any) -> None:  # a SQLAlchemy Connection
        if getattr(_durable, "on", False):  # the session default is off (set when connecting)
            connection.exec_driver_sql("SET LOCAL synchronous_commit = on")

    for name in _DURABLE_WRITES:
        method = getattr(storage, name)

        def durable(*args, __method=method, **kwargs):
            previous = getattr(_durable, "on", False)
            _durable.on = True
            try:
                return __method(*args, **kwargs)
            finally:
                _durable.on = previous

        setattr(storage, name, durable)


def with_installed_driver(url: str) -> str:
    """``postgresql://`` names no driver, and SQLAlchemy 2.1 then wants psycopg 3; use psycopg2
    (tightfit's ``postgres`` extra) when only that one is installed."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    cred, _, host = tail.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user}:***@{host}"


def heartbeat_enabled(storage: BaseStorage) -> bool:
    heartbeat = heartbeat_of(storage)
    return heartbeat is not None and heartbeat.get_heartbeat_interval() is not None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of dead workers (and queue their retries); no-op without heartbeats."""
    storage = study_storage(study)
    if not heartbeat_enabled(storage):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    _fail_trials_without_heartbeat(study)
    # the grace period is also the time a live process gets to queue the retry of a trial it failed
    requeue_lost_trials(study, settle_s=grace_period_s(storage))


def grace_period_s(storage: BaseStorage) -> float:
    """Seconds without a heartbeat after which a running trial is stale (Optuna's default: two beats)."""
    heartbeat = heartbeat_of(storage)
    interval = heartbeat.get_heartbeat_interval() if heartbeat is not None else None
    return getattr(storage_backend(storage), "grace_period", None) or 2 * (interval or HEARTBEAT_INTERVAL_S)


def _fail_trials_without_heartbeat(study: optuna.Study) -> None:
    """Optuna never declares stale a RUNNING trial that has no heartbeat yet: one whose worker died
    between creating it and its first heartbeat. Our loop writes the ``worker`` attribute right after
    that first heartbeat, so a trial without it, running for longer than the grace period, is one of
    those (compared with this machine's clock: keep the workers' clocks within the grace period)."""
    storage = study_storage(study)
    heartbeat = heartbeat_of(storage)
    interval = heartbeat.get_heartbeat_interval() if heartbeat is not None else None
    if heartbeat is None or interval is None:  # called only with heartbeats enabled (fail_stale_trials)
        return
    cutoff = datetime.now() - timedelta(seconds=grace_period_s(storage))
    callback = heartbeat.get_heartbeat_stale_trial_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR in t.user_attrs or t.datetime_start is None or t.datetime_start > cutoff:
            continue
        try:
            if not storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id(t))))


@contextmanager
def trial_heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat now and every heartbeat_interval seconds until the block ends.

    Unlike Optuna's own thread (used only inside ``Study.optimize``), a failed write is logged and
    retried at the next beat instead of ending the thread, so one network hiccup does not turn a
    healthy trial stale.
    """
    heartbeat = heartbeat_of(study_storage(study))
    interval = heartbeat.get_heartbeat_interval() if heartbeat is not None else None
    if heartbeat is None or interval is None:  # heartbeats not enabled
        yield
        return
    handle = trial_id(trial)  # Optuna's handle; FrozenTrial/Trial expose no public id
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                heartbeat.record_heartbeat(handle)
            except Exception as exc:  # keep beating; the grace period absorbs a few misses
                log.warning("heartbeat of trial %d failed: %s", trial.number, exc)

    heartbeat.record_heartbeat(handle)
    thread = threading.Thread(target=beat, name=f"tightfit-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
