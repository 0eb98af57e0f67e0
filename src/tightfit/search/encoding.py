"""Between a search space and the unit cube: each dimension becomes one coordinate in [0, 1].

Categorical choices are ordered by value (bit widths) and take equal slices of [0, 1]. The
*gentle* end of a coordinate is the one closest to the operator's identity (sparsity 0, the most
bits), so ``0`` means "leave the layer alone" and ``1`` "compress it as hard as allowed".
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from .space import Dimension, SearchSpace, numeric_range


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every dimension, as ``space.suggest`` asks for it."""
    out: dict[str, BaseDistribution] = {}
    for dim in space.dimensions:
        hp = dim.hyperparameter
        if hp.choices is not None:
            out[dim.key] = CategoricalDistribution(list(hp.choices))
        elif hp.integer:
            low, high = numeric_range(hp)
            out[dim.key] = IntDistribution(int(low), int(high), log=hp.log)
        else:
            out[dim.key] = FloatDistribution(*numeric_range(hp), log=hp.log)
    return out


def _identity_value(space: SearchSpace, dim: Dimension) -> Any:
    for op in space.strategy:
        if op.name == dim.operator:
            return op.identity().get(dim.hyperparameter.name)
    return None


class UnitEncoding:
    """Maps parameter dicts to points of ``[0, 1]^d`` (gentle end at 0) and back."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.keys = [d.key for d in space.dimensions]  # recovery hyperparameters are sampled apart
        self.dims = list(space.dimensions)
        self._flip: list[bool] = []
        self._choices: list[list[Any] | None] = []
        for dim in self.dims:
            hp = dim.hyperparameter
            ident = _identity_value(space, dim)
            if hp.choices is not None:
                ordered = sorted(hp.choices, key=_sort_key)
                self._choices.append(ordered)
                flip = _numeric(ident) and _numeric(ordered[-1]) and abs(ordered[-1] - ident) < abs(ordered[0] - ident)
            else:
                self._choices.append(None)
                low, high = numeric_range(hp)
                flip = _numeric(ident) and abs(high - ident) < abs(low - ident)
            self._flip.append(bool(flip))

    @property
    def d(self) -> int:
        return len(self.dims)

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for i, dim in enumerate(self.dims):
            u = float(np.clip(x[i], 0.0, 1.0))
            if self._flip[i]:
                u = 1.0 - u
            hp = dim.hyperparameter
            choices = self._choices[i]
            if choices is not None:
                params[dim.key] = choices[min(int(u * len(choices)), len(choices) - 1)]
                continue
            low, high = numeric_range(hp)
            if hp.log and low > 0:
                value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
            else:
                value = low + u * (high - low)
            value = min(max(value, low), high)
            params[dim.key] = int(round(value)) if hp.integer else float(value)
        return params

    def encode(self, params: dict[str, Any]) -> np.ndarray:
        x = np.zeros(self.d)
        for i, dim in enumerate(self.dims):
            hp = dim.hyperparameter
            value = params[dim.key]
            choices = self._choices[i]
            if choices is not None:
                u = (choices.index(value) + 0.5) / len(choices)
                x[i] = 1.0 - u if self._flip[i] else u
                continue
            low, high = numeric_range(hp)
            if high == low:
                u = 0.0
            elif hp.log and low > 0:
                u = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
            else:
                u = (value - low) / (high - low)
            x[i] = 1.0 - u if self._flip[i] else u
        return np.clip(x, 0.0, 1.0)

    def plans(self, limit: int) -> np.ndarray | None:
        """Every distinct plan of the space as points (one row each), or None when the space has a
        continuous dimension or more than ``limit`` plans."""
        values: list[list[Any]] = []
        for i, dim in enumerate(self.dims):
            choices = self._choices[i]
            if choices is None and not dim.hyperparameter.integer:
                return None
            if choices is None:
                low, high = numeric_range(dim.hyperparameter)
                choices = list(range(int(low), int(high) + 1))
            values.append(choices)
        if math.prod(len(v) for v in values) > limit:
            return None
        return np.array([self.encode(dict(zip(self.keys, combo))) for combo in itertools.product(*values)])

    def is_continuous(self, i: int) -> bool:
        return self._choices[i] is None and not self.dims[i].hyperparameter.integer


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if _numeric(v) else (1, str(v))


#: the levels a numeric dimension is set to when it is measured alone (0: gentle end, 1: as hard as
#: allowed): the sensitivity-greedy baseline and the metric objective's warm start share them
NUMERIC_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def unit_levels(enc: UnitEncoding, i: int) -> list[float]:
    """Dimension ``i``'s levels in the unit cube, gentle first: each choice's slice, or NUMERIC_LEVELS."""
    hp = enc.dims[i].hyperparameter
    if hp.choices is not None:
        n = len(hp.choices)
        return [(k + 0.5) / n for k in range(n)]
    return list(NUMERIC_LEVELS)


def in_space(trial: optuna.trial.FrozenTrial, keys: list[str]) -> bool:
    return all(k in trial.params for k in keys)
