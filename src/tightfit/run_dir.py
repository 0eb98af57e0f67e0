"""The run directory: one search's study, trials, best model, summary and plot, on disk.

Layout: ``study.db`` (Optuna, SQLite), ``best.tfz`` (best feasible model so far, kept during the
search so no trial is evaluated twice), ``model.tfz`` (the result), ``summary.json``,
``trials.csv``, ``trials.png``, ``example_input.pt`` (for `tightfit export`) and ``.lock``
(present while a process runs the search). Every file is written atomically (``_io.write_atomic``)
and nothing read back from here runs code: models are loaded into the model the caller holds.
"""

from __future__ import annotations

import fcntl
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from ._io import write_atomic
from .errors import ConfigError
from .export.artifact import read_manifest

STUDY_FILE = "study.db"
BEST_FILE = "best.tfz"
MODEL_FILE = "model.tfz"
SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.csv"
PLOT_FILE = "trials.png"
#: the run's example input (``torch.save``), which ``tightfit export`` checks the outputs on
EXAMPLE_INPUT_FILE = "example_input.pt"

# The keys tightfit stores on the study and its trials, all in one place. A trial's user
# attributes are written and read by :class:`tightfit.records.TrialAttrs`.
#: study user attributes: the original model's measurement and the run's settings (checked on resume)
BASELINE_ATTR = "tightfit.baseline"
SETTINGS_ATTR = "tightfit.settings"
#: trial user attributes
PLAN_ATTR = "plan"
MEASUREMENT_ATTR = "measurement"
FINETUNE_STEPS_ATTR = "finetune_steps"
FINETUNE_S_ATTR = "finetune_s"
METRIC_SE_ATTR = "metric_se"
PREDICTION_SE_ATTR = "prediction_se"
VAL_SAMPLES_ATTR = "val_samples"
FIDELITY_ATTR = "fidelity"
STOP_REASON_ATTR = "stop_reason"
STAGE_REACHED_ATTR = "stage_reached"
SEQUENTIAL_ATTR = "sequential"
EVALUATIONS_ATTR = "evaluations"
CURVE_ATTR = "stage_curve"
RECOVERY_ATTR = "recovery"
SCREEN_CONSTRAINTS_ATTR = "screen_constraints"
SCREEN_PREDICTION_ATTR = "screen_prediction"
PROBE_SAMPLES_ATTR = "probe_samples"
PROBE_S_ATTR = "probe_s"
SEARCH_TIME_ATTR = "search_time_s"
DURATION_ATTR = "duration_s"
ERROR_ATTR = "error"
TRACEBACK_ATTR = "traceback"
INTERRUPTED_ATTR = "interrupted"
RETRY_OF_ATTR = "retry_of"  # a queued retry: the number of the trial it replaces
WORKER_ATTR = "worker"  # "host:pid" of the process evaluating a trial
#: trial system attributes (samplers' state)
INCUMBENT_ATTR = "tightfit.search.incumbent_objective"
GP_ATTR = "tightfit.bo.gp"
ROUNDS_FILE = "rounds.json"  # prune-and-adjust's record of its rounds
LOCK_FILE = ".lock"


#: Files a run writes besides its study; a run directory holding any of them has a study worth keeping.
RUN_FILES = (BEST_FILE, MODEL_FILE, SUMMARY_FILE, TRIALS_FILE, PLOT_FILE, EXAMPLE_INPUT_FILE, ROUNDS_FILE)

# Run directories whose lock this thread holds ((resolved path, thread) -> nesting depth): `tightfit
# run` takes the lock before it opens the storage, and compress takes it again inside. Another
# thread of the process is refused, as another process is.
_held: dict[tuple[Path, int], int] = {}


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    @contextmanager
    def open(cls, path: str | os.PathLike) -> Iterator[RunDir]:
        """Create the directory if needed and hold its lock while the search runs (re-entrant
        within one thread). The ``.lock`` file is removed when the block ends; a killed process
        leaves it behind, harmlessly: the kernel released its lock."""
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"`run_dir` {str(root)!r} cannot be created: {exc}.") from exc
        key = (root.resolve(), threading.get_ident())
        if key in _held:
            _held[key] += 1
            try:
                yield cls(root)
            finally:
                _held[key] -= 1
            return
        lock_path = root / LOCK_FILE
        handle = _acquire(root, lock_path)
        _held[key] = 1
        try:
            yield cls(root)
        finally:
            del _held[key]
            # unlink while still holding the lock: a process that opened the old file and waits for
            # it sees, once it gets it, that the path no longer names that file, and opens it anew
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.path / STUDY_FILE).resolve()}"

    def _write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(self.path / name, data)

    def write_best(self, data: bytes) -> None:
        self._write_atomic(BEST_FILE, data)

    def read_best(self, trial_number: int) -> bytes | None:
        """The saved best model, if it is the one of ``trial_number``."""
        path = self.path / BEST_FILE
        if not path.exists():
            return None
        try:
            if read_manifest(path).get("trial") != trial_number:
                return None
        except Exception:
            return None
        return path.read_bytes()

    def write_model(self, data: bytes) -> None:
        self._write_atomic(MODEL_FILE, data)

    def write_example_input(self, example_input: Any) -> None:
        """Keep the example input for `tightfit export` (read back with ``weights_only=True``): a
        copy of each tensor, so that a slice of a large tensor does not store all of it."""
        buffer = io.BytesIO()
        torch.save(own_storage(example_input), buffer)
        self._write_atomic(EXAMPLE_INPUT_FILE, buffer.getvalue())


def own_storage(value: Any) -> Any:
    """``value`` with every tensor (in tuples, lists and dicts) replaced by a compact copy:
    ``torch.save`` writes a tensor's whole storage (a 1x64 row sliced from the 1797x64 digits set
    was 93 KB on disk)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(value, tuple):
        return tuple(own_storage(v) for v in value)
    if isinstance(value, list):
        return [own_storage(v) for v in value]
    if isinstance(value, dict):
        return {k: own_storage(v) for k, v in value.items()}
    return value


def _acquire(root: Path, lock_path: Path) -> TextIO:
    """Open and lock ``lock_path``; the open file, which holds the lock until it is closed."""
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open until the run ends: it is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"`run_dir` {str(root)!r} is in use by {owner}; wait for it to finish or use another run_dir."
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed this file as it finished: lock the current one
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
