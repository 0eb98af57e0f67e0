"""Constraints on a compressed model. A constraint's value is <= 0 when it is met (Optuna's sign)."""

from __future__ import annotations

import abc
import math
import warnings

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
            raise ConfigError(
                "MaxLatency needs latency measurements: pass `example_input` (or `latency=`) to compress."
            )
        return (measured.latency_ms - self.max_ms) / self.max_ms

    def describe(self) -> str:
        return f"MaxLatency({self.max_ms:g})"


class MaxBits(Constraint):
    """The saved file may hold at most ``bits_per_weight`` bits per weight of the compressible layers:
    the file's bytes x 8 / the original's weight count (file overhead, scales, biases and the layers
    left alone included, so it is the file's size in the units of a weight; what ModelOpt's
    "effective bits" approximates). float32 is about 32 plus the rest of the model."""

    def __init__(self, bits_per_weight: float) -> None:
        self.bits = _check_number("MaxBits", "bits_per_weight", bits_per_weight)
        if self.bits <= 0:
            raise ConfigError(f"MaxBits: `bits_per_weight` must be > 0, but got {bits_per_weight!r}.")

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        return (measured.bits_per_weight - self.bits) / self.bits

    def describe(self) -> str:
        return f"MaxBits({self.bits:g})"


class MaxFlops(Constraint):
    """At most ``max_flops`` FLOPs per forward pass of ``example_input``, counting nonzero weights
    only (``tightfit.measure.analysis.sparse_flops``: what the trials' ``flops`` column holds)."""

    def __init__(self, max_flops: float) -> None:
        self.max_flops = _check_number("MaxFlops", "max_flops", max_flops)
        if self.max_flops <= 0:
            raise ConfigError(f"MaxFlops: `max_flops` must be > 0, but got {max_flops!r}.")

    def value(self, measured: Measurement, baseline: Measurement) -> float:
        if measured.flops is None:
            raise ConfigError("MaxFlops needs FLOP counts: pass `example_input` to compress.")
        return (measured.flops - self.max_flops) / self.max_flops

    def describe(self) -> str:
        return f"MaxFlops({self.max_flops:g})"


#: constraints on a resource (not on the metric): what ``objective="metric"`` needs at least one of
RESOURCE_CONSTRAINTS = (MaxSize, MaxLatency, MaxBits, MaxFlops)


def check_max_drop(constraints: list[Constraint], evaluate: object, baseline_metric: float) -> str | None:
    """Warn about a ``MaxDrop`` no plan could break, once the original's metric is known, and return
    the warning (for the result's notes); None when there is nothing to say.

    With a metric whose range is known (``value_range``, e.g. ``Accuracy``'s [0, 1]): a drop that
    takes the bound below the range's low end (``MaxDrop(2)`` where ``MaxDrop(0.02)`` was meant).
    With a metric of unknown range whose original value lies in (0, 1]: a drop of 1 or more. A
    warning, not an error: "any metric will do" (a size-only search) is a legitimate wish, and a
    metric on another scale (a negative loss, a count) may mean it.
    """
    value_range = getattr(evaluate, "value_range", None)
    for drop in (c for c in constraints if isinstance(c, MaxDrop)):
        floor = baseline_metric - drop.max_drop
        if value_range is not None and floor < float(value_range[0]):
            low, high = (float(v) for v in value_range)
            message = (
                f"MaxDrop({drop.max_drop:g}): `max_drop` lets the metric fall to {floor:.4g} from the original's "
                f"{baseline_metric:.4g}, below the lowest value it can take ({low:g}; range [{low:g}, {high:g}]), "
                "so no plan can break it. The drop is in the metric's units: MaxDrop(0.02) allows two points."
            )
        elif value_range is None and 0.0 < baseline_metric <= 1.0 and drop.max_drop >= 1.0:  # 0: a loss, likely
            message = (
                f"MaxDrop({drop.max_drop:g}): `max_drop` is {drop.max_drop:g} while the original's metric is "
                f"{baseline_metric:.4g}; if the metric is a fraction in [0, 1] (accuracy), no plan can break it. "
                "The drop is in the metric's units (MaxDrop(0.02) allows two points); ignore this if the "
                "metric's scale is wider."
            )
        else:
            continue
        warnings.warn(message, UserWarning, stacklevel=3)
        return message
    return None
