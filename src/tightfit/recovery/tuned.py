"""Tuned recovery (HyperNOMAD-style): a recovery's own hyperparameters join the search space.

``compress(finetune=Tuned(LearningCompression(loader), lr=(1e-4, 1e-2), epochs=(2, 8)))``: each
trial's sampler picks the compression plan *and* these values; the trial trains with
``recovery.with_settings(**values)``. The hook compress() uses is duck-typed: any ``finetune``
with ``hyperparameters() -> [Hyperparameter]`` and ``with_settings(**values) -> callable`` is tuned.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..operators.base import Hyperparameter
from ._base import with_settings


def _as_hyperparameter(name: str, spec: Any) -> Hyperparameter:
    """``Hyperparameter`` as is; ``(low, high)`` a range (integer when both are ints, log-scaled
    when both are positive floats spanning >= 100x); ``[a, b, ...]`` categorical choices."""
    if isinstance(spec, Hyperparameter):
        return spec
    if isinstance(spec, list):
        return Hyperparameter(name, choices=tuple(spec))
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    ):
        low, high = spec
        if all(isinstance(v, int) for v in spec):
            return Hyperparameter(name, low=low, high=high, integer=True)
        log = low > 0 and high / low >= 100
        return Hyperparameter(name, low=float(low), high=float(high), log=log)
    raise ConfigError(
        f"Tuned: `{name}` must be a Hyperparameter, a (low, high) range or a [choice, ...] list, but got {spec!r}."
    )


class Tuned:
    """Wrap a recovery so the search tunes some of its hyperparameters.

    Without keyword arguments, the recovery's own default ranges (``recovery.tunable()``) are used;
    otherwise exactly the names given. Called directly, it trains with the recovery's defaults.
    """

    def __init__(self, recovery: Any, **ranges: Any) -> None:
        if not callable(recovery):
            raise ConfigError(f"Tuned: `recovery` must be a recovery callable(model), but got {recovery!r}.")
        if not ranges:
            if not hasattr(recovery, "tunable"):
                raise ConfigError(
                    f"Tuned: {type(recovery).__name__} declares no default ranges; name them, e.g. Tuned(r, lr=(1e-4, 1e-2))."
                )
            specs = dict(recovery.tunable())
        else:
            specs = {name: _as_hyperparameter(name, spec) for name, spec in ranges.items()}
        missing = sorted(n for n in specs if not hasattr(recovery, n))
        if missing:
            raise ConfigError(f"Tuned: {type(recovery).__name__} has no hyperparameter(s) {missing}.")
        self.recovery = recovery
        self._last: Any = None
        self.specs = {
            name: Hyperparameter(name, hp.low, hp.high, hp.choices, hp.integer, hp.log) for name, hp in specs.items()
        }

    def hyperparameters(self) -> list[Hyperparameter]:
        return [hp for hp in self.specs.values() if not hp.fixed]

    def with_settings(self, **settings: Any) -> Any:
        fixed = {name: hp.fixed_value for name, hp in self.specs.items() if hp.fixed}
        return with_settings(self.recovery, {**fixed, **settings})

    @property
    def steps_taken(self) -> int | None:
        return getattr(self._last if self._last is not None else self.recovery, "steps_taken", None)

    def __call__(self, model: nn.Module) -> None:
        self._last = self.with_settings()
        self._last(model)

    def __repr__(self) -> str:
        return f"Tuned({self.recovery!r}, {sorted(self.specs)})"
