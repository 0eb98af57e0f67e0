"""Search methods by name. Each is an Optuna sampler (constraints reach it through
``Trial.set_constraint``, stored on the trial); the loop builds a fresh one per trial,
seeded from the run's seed and the trial count, so a resumed run suggests what an uninterrupted
one would have."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from ..errors import ConfigError
from .space import SearchSpace


def _random(seed: int, space: SearchSpace, budget: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(seed: int, space: SearchSpace, budget: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        n_startup_trials=max(3, min(10, budget // 3)),
        # Trials running in other workers count as bad results at their (already drawn) points,
        # so concurrent workers do not all suggest the same one.
        constant_liar=True,
    )


def _gp(seed: int, space: SearchSpace, budget: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(
        seed=seed,
        n_startup_trials=max(3, min(10, budget // 3)),
    )


def _auto(seed: int, space: SearchSpace, budget: int) -> optuna.samplers.BaseSampler:
    # Until the search engine's own methods land, TPE is the most reliable under small budgets and
    # constraints at the noise level (see ../shared baselines: it beats Optuna's GP at 30 trials).
    return _tpe(seed, space, budget)


SAMPLERS: dict[str, Callable[[int, SearchSpace, int], optuna.samplers.BaseSampler]] = {
    "auto": _auto,
    "tpe": _tpe,
    "random": _random,
    "gp": _gp,
}


def register_search(name: str, factory: Callable[[int, SearchSpace, int], optuna.samplers.BaseSampler]) -> None:
    """Make a search method available as ``search=name``: ``factory(seed, space, budget) -> sampler``."""
    SAMPLERS[name] = factory


def make_sampler(name: str, seed: int, space: SearchSpace, budget: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise ConfigError(f"`search` must be one of {sorted(SAMPLERS)}, but got {name!r}.")
    return SAMPLERS[name](seed, space, budget)


def check_search(name: str) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"`search` must be one of {sorted(SAMPLERS)}, but got {name!r}.")
