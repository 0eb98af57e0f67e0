"""Search methods by name. Each is an Optuna sampler (constraints reach it through
``Trial.set_constraint``, stored on the trial); the loop builds a fresh one per trial from a
:class:`SearchContext` re-seeded from the run's seed and the trial count, so a resumed run suggests
what an uninterrupted one would have.

A factory is ``factory(context) -> sampler``. Factories written for the older signature
``factory(seed, space, budget)`` are still accepted by :func:`register_search`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import optuna

from ..errors import ConfigError
from .context import SearchContext
from .space import SearchSpace

Factory = Callable[[SearchContext], optuna.samplers.BaseSampler]


def _startup(budget: int) -> int:
    return max(3, min(10, budget // 3))


def _random(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=ctx.seed)


def _tpe(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        seed=ctx.seed,
        multivariate=True,
        n_startup_trials=_startup(ctx.budget),
        # Trials running in other workers count as bad results at their (already drawn) points,
        # so concurrent workers do not all suggest the same one.
        constant_liar=True,
    )


def _gp(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=ctx.seed, n_startup_trials=_startup(ctx.budget))


def _cmaes(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    # CMA-ES covers the numeric dimensions; categorical ones (bit widths) are sampled at random.
    return optuna.samplers.CmaEsSampler(
        seed=ctx.seed,
        n_startup_trials=1,
        independent_sampler=optuna.samplers.RandomSampler(seed=ctx.seed),
        warn_independent_sampling=False,
    )


def _bo(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    from .bo import BOSampler

    return BOSampler(ctx)


def _levelset(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    from .levelset import LevelSetSampler

    return LevelSetSampler(ctx)


def _mads(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    from .mads import MadsSampler

    return MadsSampler(ctx)


def _olmp(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    from .olmp import OLMPSampler

    return OLMPSampler(ctx)


def _nsga2(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    # Constraints reach NSGA-II through the stored trials (feasible plans dominate infeasible ones).
    population = int(min(20, max(4, ctx.budget // 4)))
    return optuna.samplers.NSGAIISampler(seed=ctx.seed, population_size=population)


def auto_method(ctx: SearchContext) -> str:
    """The method ``"auto"`` runs: NSGA-II for a Pareto front; the one-knob level-set search when
    the budget is too small for a model of the whole space; constrained BO otherwise."""
    if not ctx.space.dimensions:
        return "random"
    if ctx.n_objectives > 1:
        return "nsga2"
    if ctx.objective == "metric":  # BO and the level-set search model a positive size-like objective
        # with calibration data, TPE starts from the sensitivity allocation (search/warm_metric.py)
        return "warm-tpe" if ctx.calibration_probe is not None else "tpe"
    if ctx.budget <= 10:
        return "levelset"
    return "bo"


def _warm_tpe(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    from .warm_metric import warm_tpe

    return warm_tpe(ctx)


def _auto(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    return SAMPLERS[auto_method(ctx)](ctx)


SAMPLERS: dict[str, Factory] = {
    "auto": _auto,
    "bo": _bo,
    "levelset": _levelset,
    "mads": _mads,
    "olmp": _olmp,
    "cmaes": _cmaes,
    "tpe": _tpe,
    "warm-tpe": _warm_tpe,
    "random": _random,
    "gp": _gp,
    "nsga2": _nsga2,
}


def register_search(name: str, factory: Callable[..., optuna.samplers.BaseSampler]) -> None:
    """Make a search method available as ``search=name``: ``factory(context) -> sampler`` (or the
    older ``factory(seed, space, budget) -> sampler``)."""
    try:
        n_params = len(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        n_params = 1
    if n_params == 3:
        legacy = factory
        SAMPLERS[name] = lambda ctx: legacy(ctx.seed, ctx.space, ctx.budget)
    else:
        SAMPLERS[name] = factory


def make_sampler(
    name: str, seed: int, space: SearchSpace, budget: int, context: SearchContext | None = None
) -> optuna.samplers.BaseSampler:
    check_search(name)
    ctx = context.reseeded(seed) if context is not None else SearchContext(space=space, budget=budget, seed=seed)
    return SAMPLERS[name](ctx)


def check_search(name: str) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"`search` must be one of {sorted(SAMPLERS)}, but got {name!r}.")
