"""The run directory: one search's study, trials, best model, summary and plot, on disk.

Layout: ``study.db`` (Optuna, SQLite), ``best.tfz`` (best feasible model so far, kept during the
search so no trial is evaluated twice), ``model.tfz`` (the result), ``summary.json``,
``trials.csv``, ``trials.png``, and ``.lock`` (held while a process runs the search).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    @contextmanager
    def open(cls, path: str | os.PathLike) -> Iterator[RunDir]:
        """Create the directory if needed and hold its lock while the search runs."""
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"`run_dir` {str(root)!r} cannot be created: {exc}.") from exc
        lock_path = root / ".lock"
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise ConfigError(
                    f"`run_dir` {str(root)!r} is in use by {owner}; wait for it to finish or use another run_dir."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            try:
                yield cls(root)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
