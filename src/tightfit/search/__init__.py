"""Searching per-layer hyperparameters on an Optuna study."""

from .loop import TrialOutcome, counted_trials, recover_interrupted, run_trials, trial_record
from .pick import Pick, posterior_pick
from .samplers import SAMPLERS, check_search, make_sampler, register_search
from .space import Dimension, SearchSpace, build_space

__all__ = [
    "SAMPLERS",
    "Dimension",
    "Pick",
    "SearchSpace",
    "TrialOutcome",
    "build_space",
    "check_search",
    "counted_trials",
    "make_sampler",
    "posterior_pick",
    "recover_interrupted",
    "register_search",
    "run_trials",
    "trial_record",
]
