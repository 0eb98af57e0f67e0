"""The search space: strategy x model, expanded per layer into named dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ..errors import ModelError
from ..measure.analysis import ModelAnalysis, shown_name
from ..operators.base import Hyperparameter
from ..operators.compose import Compose, why_not_taken
from ..operators.plan import Plan


def numeric_range(hp: Hyperparameter) -> tuple[float, float]:
    """``(low, high)`` of a hyperparameter without ``choices``. Hyperparameter's own check sets both
    then; this states it to the type checker and names the field should that ever break."""
    if hp.low is None or hp.high is None:
        raise ModelError(f"Hyperparameter {hp.name!r} needs `choices` or both `low` and `high`.")
    return hp.low, hp.high


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter of one operator on one layer; ``key`` is its Optuna name."""

    layer: str
    operator: str
    hyperparameter: Hyperparameter

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.operator}/{self.hyperparameter.name}"


@dataclass(frozen=True)
class SearchSpace:
    strategy: Compose
    dimensions: tuple[Dimension, ...]
    #: settings that are not searched: layer -> operator -> {name: value}
    fixed: dict[str, dict[str, dict[str, Any]]]
    #: the recovery's own searched hyperparameters (tuned recovery), keyed ``recovery/<name>``
    recovery: tuple[Hyperparameter, ...] = ()

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions] + [RECOVERY_PREFIX + hp.name for hp in self.recovery]

    def recovery_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """The recovery hyperparameters a trial's parameters set (empty without tuned recovery)."""
        return {
            hp.name: params[RECOVERY_PREFIX + hp.name] for hp in self.recovery if RECOVERY_PREFIX + hp.name in params
        }

    def suggest(self, trial: optuna.Trial) -> Plan:
        """Ask the trial for a value of every dimension and build the plan."""
        params: dict[str, Any] = {}
        named = [(d.key, d.hyperparameter) for d in self.dimensions]
        for key, hp in named + [(RECOVERY_PREFIX + hp.name, hp) for hp in self.recovery]:
            if hp.choices is not None:
                params[key] = trial.suggest_categorical(key, list(hp.choices))
            elif hp.integer:
                low, high = numeric_range(hp)
                params[key] = trial.suggest_int(key, int(low), int(high), log=hp.log)
            else:
                params[key] = trial.suggest_float(key, *numeric_range(hp), log=hp.log)
        return self.plan(params)

    def plan(self, params: dict[str, Any]) -> Plan:
        """The plan for a full assignment of the dimensions (as Optuna stores them)."""
        layers: dict[str, dict[str, dict[str, Any]]] = {
            layer: {op: dict(settings) for op, settings in per_op.items()} for layer, per_op in self.fixed.items()
        }
        for dim in self.dimensions:
            layers.setdefault(dim.layer, {}).setdefault(dim.operator, {})[dim.hyperparameter.name] = params[dim.key]
        return Plan.from_strategy(self.strategy, layers)

    def params(self, plan: Plan) -> dict[str, Any]:
        """Inverse of :meth:`plan`: the dimension values a plan sets (for enqueueing a known point)."""
        return {d.key: plan.layers[d.layer][d.operator][d.hyperparameter.name] for d in self.dimensions}


RECOVERY_PREFIX = "recovery/"


def build_space(strategy: Compose, analysis: ModelAnalysis, recovery: Sequence[Hyperparameter] = ()) -> SearchSpace:
    dimensions: list[Dimension] = []
    fixed: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in analysis.layers:
        for op in strategy.operators_for(layer):
            fixed.setdefault(layer.name, {}).setdefault(op.name, {})
            for hp in op.hyperparameters(layer):
                if hp.fixed:
                    fixed[layer.name][op.name][hp.name] = hp.fixed_value
                else:
                    dimensions.append(Dimension(layer.name, op.name, hp))
    if not fixed:
        ops = ", ".join(op.name for op in strategy)
        if analysis.layers:
            kinds = sorted({layer.kind for layer in analysis.layers})
            why = (
                f"it has {len(analysis.layers)} weight layer(s) ({', '.join(kinds)}) but {ops} takes none of them "
                "(see any warning above); prune and quantize work on every weight layer"
            )
        else:
            why = "it has no Linear/Conv layer or other layer holding a weight matrix"
        layers = "; ".join(
            f"{shown_name(layer.name)}: {why_not_taken(layer, strategy)}" for layer in analysis.layers[:6]
        )
        others = [shown_name(s.name) for s in analysis.skipped][:10]
        raise ModelError(
            " ".join(
                [f"No layer of the model can be compressed by {ops}: {why}."]
                + (
                    [f"Its weight layers and why: {layers}{' ...' if len(analysis.layers) > 6 else ''}."]
                    if layers
                    else []
                )
                + ([f"Other modules left alone: {others}."] if others else [])
            )
        )
    return SearchSpace(strategy, tuple(dimensions), fixed, tuple(recovery))
