"""A strategy: operators applied together, each to the layers it supports."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

from ..errors import ConfigError
from ..measure.analysis import LayerInfo
from .base import Operator


class Compose:
    """Operators applied in order. Structural operators (which change a layer's shape or type)
    always run before weight-level ones, whatever the order given."""

    def __init__(self, operators: Iterable[Operator]) -> None:
        ops = list(operators)
        if not ops:
            raise ConfigError("Compose: give at least one operator, e.g. Compose([Prune(), Quantize()]).")
        for op in ops:
            if not isinstance(op, Operator):
                raise ConfigError(f"Compose: every item must be a tightfit operator, but got {op!r}.")
        names = [op.name for op in ops]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"Compose: each operator may appear once, but {duplicates} appear more than once.")
        self.operators = sorted(ops, key=lambda op: not op.structural)

    def __iter__(self) -> Iterator[Operator]:
        return iter(self.operators)

    def __repr__(self) -> str:
        return f"Compose({self.operators!r})"

    def operators_for(self, layer: LayerInfo) -> list[Operator]:
        """The operators that will touch ``layer``: those that support it (a tied weight: those that
        compress one, :attr:`Operator.compresses_tied`) and whose patterns match it, or match a module
        that shares its weight (``layers=["lm_head"]`` reaches the embedding the head is tied to)."""
        return [
            op
            for op in self.operators
            if takes(op, layer) and any(_matches(name, op.layers) for name in (layer.name, *layer.tied))
        ]


def takes(operator: Operator, layer: LayerInfo) -> bool:
    """Whether ``operator`` compresses ``layer``, its ``layers`` patterns aside."""
    return operator.supports(layer) and (operator.compresses_tied or not layer.tied)


def why_not_taken(layer: LayerInfo, strategy: Compose) -> str:
    """Why no operator of ``strategy`` takes ``layer``, in a user's terms: an operator's refusal,
    the group it is pruned with only, the ``layers`` patterns, a tied weight the operators would
    untie, an operator's own reason, or its type."""
    for op in strategy:
        if layer.name in (refused := op.refused()):
            return f"{op.name}: {refused[layer.name]}"
    for op in strategy:
        if leaders := op.follows().get(layer.name):
            return (
                f"{op.name} prunes it only with the group of {', '.join(leaders)}, which the search leaves out: "
                "see the operators' `layers` patterns"
            )
    if any(takes(op, layer) for op in strategy):
        return "left out by the operators' `layers` patterns"
    for op in strategy:  # a tied weight: said so even where the leader is a type the operator skips (the head a Linear)
        if layer.tied and not op.compresses_tied:
            return op.why_not_tied(list(layer.tied))
    for op in strategy:
        if (why := op.why_not(layer)) is not None:
            return why
    return f"{' / '.join(op.name for op in strategy)} does not compress a {layer.type} layer"


def _matches(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def as_strategy(strategy: Compose | Operator) -> Compose:
    if isinstance(strategy, Compose):
        return strategy
    if isinstance(strategy, Operator):
        return Compose([strategy])
    raise ConfigError(
        f"`strategy` must be a tightfit operator or Compose([...]) of operators, but got {type(strategy).__name__}."
    )
