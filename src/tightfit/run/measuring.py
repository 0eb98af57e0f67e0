"""What a run measures besides the trials' own evaluation: the original (baseline), the static
part of a candidate (file bytes, nonzeros, FLOPs), latency, and the validation passes spent."""

from __future__ import annotations

import copy
import io
import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..evaluation.constraints import MinMetric
from ..evaluation.metrics import evaluate_metric, evaluate_original
from ..evaluation.sequential import paired_drop, value_width
from ..export.artifact import to_bytes
from ..measure.analysis import count_nonzeros, layer_weights, sparse_flops
from ..measure.latency import Latency
from ..operators.plan import Plan
from ..records import Measurement

log = logging.getLogger("tightfit")


def float32_file_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the file a user ships without tightfit."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def timed(latency: Latency | None, model: nn.Module) -> dict[str, float | None]:
    if latency is None:
        return {"latency_ms": None, "latency_iqr_ms": None}
    measured = latency(model)
    return {"latency_ms": measured.median_ms, "latency_iqr_ms": measured.iqr_ms}


def original_flops(original, example_input, layer_names, objective) -> int | None:
    """The original's FLOPs on ``example_input``, or None when they cannot be counted there (an
    error only when they are the objective). Counted once: the baseline reuses the number."""
    if example_input is None:
        return None
    try:
        return sparse_flops(original, example_input, layer_names)
    except Exception as exc:
        if objective == "flops":
            raise ConfigError(
                f"`example_input` does not run through the model under torch's FLOP counter "
                f"({type(exc).__name__}: {exc}); give an input the model's forward accepts."
            ) from exc
        log.warning("FLOPs are not counted: the model fails on example_input (%s: %s)", type(exc).__name__, exc)
        return None


def measure_baseline(original, evaluate, layer_names, flops: int | None, latency=None) -> Measurement:
    nonzeros, total = count_nonzeros(original, layer_names)
    return Measurement(
        **timed(latency, original),
        metric=evaluate_original(evaluate, copy.deepcopy(original)),  # says it was the original's evaluation
        size_bytes=float32_file_bytes(original),
        nonzeros=nonzeros,
        weight_params=total,
        flops=flops,
    )


class ForwardPasses:
    """Counts validation forward passes through a metric's ``samples_evaluated`` (None if it has none)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.last = self._now()

    def _now(self) -> int | None:
        value = getattr(self.metric, "samples_evaluated", None)
        return int(value) if isinstance(value, int) else None

    def take(self) -> int | None:
        """Forward passes since the last call."""
        now = self._now()
        delta = None if now is None or self.last is None else now - self.last
        self.last = now
        return delta


class OriginalValues:
    """The original's per-sample metric values on the validation set, read once when a run opens,
    so that full evaluation stores a trial's ``metric_se`` as the standard error of its *drop*, paired
    over the same samples (what ``Sequential`` does too).

    The drop is what ``MaxDrop`` constrains, and its paired standard error is much smaller than the
    metric's own: on 5,000 Fashion-MNIST validation images a plan's accuracy has a binomial s.e. of
    about 0.37 points, its paired drop from the original 0.12-0.24 (docs/search.md, "The final
    pick"). With the metric's s.e. as noise, the constraint models of ``bo`` and of the final pick
    smoothed measurements four to ten times more precise than they assumed. A ``MinMetric``
    constraint is a level, not a drop, so with one the metric's own s.e. is kept."""

    def __init__(self, values: torch.Tensor | None, width: float = 1.0) -> None:
        self.values = values
        self.width = width

    @classmethod
    def read(cls, evaluate, original: nn.Module, constraints) -> tuple[OriginalValues, float | None]:
        """The values (none for a plain callable, or with a ``MinMetric``) and the original's metric
        read from them (None when not read: the caller evaluates the original itself)."""
        if not _per_sample(evaluate) or any(isinstance(c, MinMetric) for c in constraints):
            return cls(None), None
        holder: list[torch.Tensor] = []

        def mean(model: nn.Module) -> float:
            holder.append(evaluate.per_sample(model).to(torch.float64))
            return float(holder[-1].mean())

        metric = evaluate_original(mean, copy.deepcopy(original))
        return cls(holder[-1], value_width(evaluate, holder[-1])), metric

    def metric(self, evaluate, model: nn.Module) -> tuple[float, float | None]:
        """The metric on the full validation set and, for a per-sample metric, its standard error
        (paired with the original's values when they were read)."""
        if not _per_sample(evaluate):
            return evaluate_metric(evaluate, model), None
        values = evaluate.per_sample(model).to(torch.float64)
        metric = evaluate_metric(lambda _m: float(values.mean()), model)
        if values.numel() < 2:
            return metric, None
        if self.values is None or self.values.shape != values.shape:
            return metric, float(values.std(unbiased=True) / values.numel() ** 0.5)
        return metric, paired_drop(self.values, values, self.width).se  # as Sequential's estimates


def _per_sample(evaluate) -> bool:
    return getattr(evaluate, "per_sample", None) is not None and hasattr(evaluate, "num_samples")


class StaticMeasure:
    """What does not need the validation set: the saved file's bytes, nonzeros and FLOPs."""

    def __init__(self, artifact_extra, layer_names, example_input, baseline: Measurement) -> None:
        self.artifact_extra = artifact_extra
        self.layer_names = layer_names
        self.example_input = example_input
        self.baseline = baseline

    def __call__(
        self, candidate: nn.Module, plan: Plan, number: int, reuse: Measurement | None = None
    ) -> tuple[bytes, Measurement]:
        """With ``reuse`` (the same plan measured before fine-tuning, which holds masks), only the file is redone."""
        data = to_bytes(candidate, plan, {**(self.artifact_extra or {}), "trial": number})
        if reuse is not None:
            return data, Measurement(float("nan"), len(data), reuse.nonzeros, reuse.weight_params, reuse.flops)
        nonzeros, _ = count_nonzeros(candidate, self.layer_names)
        flops = (
            sparse_flops(candidate, self.example_input, self.layer_names) if self.example_input is not None else None
        )
        return data, Measurement(
            metric=float("nan"),
            size_bytes=len(data),
            nonzeros=nonzeros,
            weight_params=self.baseline.weight_params,
            flops=flops,
        )


def one_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as samplers read it (magnitudes): a recurrent layer's matrices as one flat tensor."""
    weights = [w.detach() for w in layer_weights(layer)]
    return weights[0].clone() if len(weights) == 1 else torch.cat([w.reshape(-1) for w in weights])
