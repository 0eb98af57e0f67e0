"""The data of a run, as plain typed records: measurements, trials, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .measure.analysis import SkippedModule
from .operators.plan import Plan


@dataclass(frozen=True)
class Measurement:
    """What was measured of one model. Units: ``size_bytes`` is bytes of the saved ``.tfz`` file;
    ``nonzeros``/``weight_params`` count entries of the compressible layers' weights; ``flops``
    is per forward pass of the example input, counting nonzero weights only (None without one);
    ``latency_ms`` is the measured median forward time of the saved model, ``latency_iqr_ms`` its
    interquartile range (None when latency was not measured)."""

    metric: float
    size_bytes: int
    nonzeros: int
    weight_params: int
    flops: int | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None

    @property
    def nonzero_ratio(self) -> float:
        """Weights over nonzero weights: the compression figure the pruning literature quotes."""
        return self.weight_params / max(1, self.nonzeros)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "size_bytes": self.size_bytes,
            "nonzeros": self.nonzeros,
            "weight_params": self.weight_params,
            "flops": self.flops,
            "latency_ms": self.latency_ms,
            "latency_iqr_ms": self.latency_iqr_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(**{k: data.get(k) for k in (
            "metric", "size_bytes", "nonzeros", "weight_params", "flops", "latency_ms", "latency_iqr_ms")})


@dataclass(frozen=True)
class TrialRecord:
    """One evaluation of the search: a plan, what it measured, and whether it met the constraints."""

    number: int
    state: str  # "COMPLETE", "FAIL", "RUNNING", ...
    plan: Plan | None
    measurement: Measurement | None
    objective: float | None
    constraints: tuple[float, ...]
    error: str | None = None
    duration_s: float | None = None
    #: accounting: validation samples evaluated (forward passes), fine-tuning steps; None if unknown
    val_samples: int | None = None
    finetune_steps: int | None = None
    #: standard error of ``measurement.metric`` (sampling noise of the validation estimate); for a
    #: cheap evaluation's "stopped" trial, the spread of its predicted constraint values
    metric_se: float | None = None
    #: "full"; with cheap evaluation also "screen" (only screened) or "stopped" (fine-tune stopped
    #: at a stage); neither is ever the answer
    fidelity: str | None = None
    #: the optimizer's own time to make this trial's suggestion (seconds; includes its probes)
    search_time_s: float | None = None
    #: validation samples and seconds the optimizer's probes (no fine-tune) used for this suggestion
    probe_samples: int | None = None
    probe_s: float | None = None

    @property
    def feasible(self) -> bool:
        # a screened candidate's constraint values may be predictions (cheap evaluation): not measured
        return self.state == "COMPLETE" and self.fidelity != "screen" and all(c <= 0 for c in self.constraints)


@dataclass
class Result:
    """What ``tightfit.compress`` hands back. ``model`` is the best feasible compressed model, read
    back from the saved file, or a copy of the original when nothing feasible was found."""

    model: nn.Module
    plan: Plan | None
    metric: float
    baseline_metric: float
    size_bytes: int
    baseline_size_bytes: int
    nonzero_ratio: float
    feasible: bool
    objective: str
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best_trial: TrialRecord | None
    run_dir: str | None
    message: str
    baseline: Measurement | None = None
    notes: list[str] = field(default_factory=list)
    #: modules holding parameters that no operator touched, with the reason
    left_alone: list[SkippedModule] = field(default_factory=list)
    #: with cheap evaluation: how sure we are that ``model`` meets the constraints on new data
    certificate: Any = None
    #: totals of the run: validation forward passes, fine-tuning steps, wall time (see ``accounting``)
    accounting: dict[str, Any] = field(default_factory=dict)
    #: the bytes of the saved file (what ``tightfit.save`` writes); None when nothing was feasible
    artifact: bytes | None = field(default=None, repr=False)

    @property
    def compression_ratio(self) -> float:
        """Bytes of the original float32 model file over bytes of the compressed one."""
        return self.baseline_size_bytes / max(1, self.size_bytes)
