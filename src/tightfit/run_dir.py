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
