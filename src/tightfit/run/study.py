"""A run's Optuna study: opened (or created) on the run's storage, its settings checked on resume,
the original's measurement stored once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import BaseStorage

from ..errors import ConfigError
from ..records import Measurement
from ..run_dir import BASELINE_ATTR, SETTINGS_ATTR, RunDir
from ..scale.storage import open_storage, redact
from .measuring import measure_baseline


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna logs every trial at INFO; tightfit shows its own progress instead."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def open_study(
    run: RunDir | None, storage, study_name: str, settings: dict[str, Any], multi: bool = False
) -> tuple[optuna.Study, str | None]:
    """The study (created if new) and its storage URL. Database storages get heartbeats on running
    trials (tightfit.scale), so workers that die are noticed and their trials retried."""
    if isinstance(storage, BaseStorage):
        backend, url = storage, getattr(storage, "url", None)
    else:
        url = storage or (run.storage_url if run is not None else None)
        backend = open_storage(url) if url is not None else None
    try:
        directions = ["minimize", "maximize"] if multi else ["minimize"]
        study = optuna.create_study(storage=backend, study_name=study_name, directions=directions, load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        study = optuna.load_study(storage=backend, study_name=study_name)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        diff = sorted(k for k in settings if stored.get(k) != settings[k])
        raise ConfigError(
            f"The study {study_name!r} at {redact(url or 'memory')} was started with different settings "
            f"({', '.join(diff)} differ). Resume with the same arguments, or use a new run_dir / study_name."
        )
    return study, url


def stored_baseline(study, original, evaluate, layer_names, flops: int | None, latency=None) -> Measurement:
    """The original's measurement: stored on the study the first time, read back on resume."""
    stored = study.user_attrs.get(BASELINE_ATTR)
    if latency is not None:  # trials are timed against the original, round by round (measure/latency.py)
        latency.set_reference(original, None if stored is None else stored.get("latency_ms"))
    if stored is not None:
        return Measurement.from_dict(stored)
    baseline = measure_baseline(original, evaluate, layer_names, flops, latency)
    study.set_user_attr(BASELINE_ATTR, baseline.to_dict())
    return baseline
