"""Constraints on a compressed model. A constraint's value is <= 0 when it is met (Optuna's sign)."""

from __future__ import annotations

import abc
import math

from ..errors import ConfigError
from ..records import Measurement


class Constraint(abc.ABC):
    """What a compressed model must satisfy, given its measurement and the original's."""

    @abc.abstractmethod
    def value(self, measured: Measurement, baseline: Measurement) -> float:
        """<= 0 when met; the larger, the further from met."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    def __repr__(self) -> str:
        return self.describe()


def _check_number(owner: str, name: str, value: float, minimum: float = 0.0) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: `{name}` must be a number, but got {value!r}.") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{owner}: `{name}` must be a finite number >= {minimum}, but got {value!r}.")
    return value


class MaxDrop(Constraint):
    """The metric may fall at most ``max_drop`` below the original model's (same units as the metric)."""

    def __init__(self, max_drop: float) -> None:
        self.max_drop = _check_number("MaxDrop", "max_drop", max_drop)

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        return (baseline.metric - measured.metric) - self.max_drop

    def describe(self) -> str:
        return f"MaxDrop({self.max_drop:g})"


class MinMetric(Constraint):
    """The metric must be at least ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = _check_number("MinMetric", "threshold", threshold, minimum=-math.inf)

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        return self.threshold - measured.metric

    def describe(self) -> str:
        return f"MinMetric({self.threshold:g})"


class MaxSize(Constraint):
    """The saved model file may be at most ``max_bytes`` bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(_check_number("MaxSize", "max_bytes", max_bytes, minimum=1))

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        # Relative, so the sampler's constraint model sees values of order one.
        return (measured.size_bytes - self.max_bytes) / self.max_bytes

    def describe(self) -> str:
        return f"MaxSize({self.max_bytes})"


class MaxLatency(Constraint):
    """The measured forward latency may be at most ``max_ms`` milliseconds (see ``tightfit.Latency``
    for how, on which batch size and thread count, it is measured)."""

    def __init__(self, max_ms: float) -> None:
        self.max_ms = _check_number("MaxLatency", "max_ms", max_ms)
        if self.max_ms <= 0:
            raise ConfigError(f"MaxLatency: `max_ms` must be > 0, but got {max_ms!r}.")

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        if measured.latency_ms is None:
            raise ConfigError("MaxLatency needs latency measurements: pass `example_input` (or `latency=`) to compress.")
        return (measured.latency_ms - self.max_ms) / self.max_ms

    def describe(self) -> str:
        return f"MaxLatency({self.max_ms:g})"
