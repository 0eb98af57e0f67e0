"""Every use of Optuna's private API in one place (checked against Optuna 5.x; pyproject pins
``optuna>=5.0,<6``). When Optuna changes one of these, this module is the only one to fix.

Why each is needed: a live trial's storage id (``Trial._trial_id``, ``FrozenTrial._trial_id``) is
the only handle Optuna's storages take, and neither trial class exposes it publicly; samplers keep
per-trial state as system attributes through the study's storage (``Study._storage``), as Optuna's
own samplers do; ``Study._get_trials(use_cache=True)`` is what Optuna's samplers read in the same
``ask``, so one storage query serves both; heartbeats are an interface of ``optuna.storages._heartbeat``.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (FrozenTrial and Trial expose no public id)."""
    return trial._trial_id


def live_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """Optuna's own handle on a stored trial, to set its attributes."""
    return optuna.trial.Trial(study, trial_id(frozen))


def cached_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as its samplers read them in the same ``ask`` (cached: no second query)."""
    return study._get_trials(deepcopy=False, use_cache=True)


def trial_system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A live trial's system attributes, as stored now (also those a sampler set during ``ask``)."""
    return study_storage(trial.study).get_trial_system_attrs(trial_id(trial))


def set_trial_system_attr(
    study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, key: str, value: Any
) -> None:
    """Store a sampler's per-trial state (as Optuna's own samplers do)."""
    study_storage(study).set_trial_system_attr(trial_id(trial), key, value)


def heartbeat_of(storage: BaseStorage) -> optuna.storages._heartbeat.BaseHeartbeat | None:
    """The storage as Optuna's heartbeat interface, or None if it does not implement it."""
    return storage if isinstance(storage, optuna.storages._heartbeat.BaseHeartbeat) else None


def is_heartbeat_storage(storage: BaseStorage) -> bool:
    """Whether the storage implements Optuna's heartbeat interface."""
    return heartbeat_of(storage) is not None


def storage_backend(storage: BaseStorage) -> BaseStorage:
    """The storage a caching wrapper (``_CachedStorage``) holds, or the storage itself."""
    return getattr(storage, "_backend", storage)
