"""The data of a run, as plain typed records: measurements, trials, the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import run_dir as keys
from .measure.analysis import SkippedModule
from .operators.plan import Plan

#: the objectives a run may minimize, each a field of :class:`Measurement`
OBJECTIVE_FIELDS = {
    "size": "size_bytes",
    "nonzeros": "nonzeros",
    "flops": "flops",
    "latency": "latency_ms",
    "metric": "metric",
}


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
        fields: dict[str, Any] = {
            k: data.get(k)
            for k in ("metric", "size_bytes", "nonzeros", "weight_params", "flops", "latency_ms", "latency_iqr_ms")
        }
        return cls(**fields)

    def objective(self, name: str) -> float:
        """The value of objective ``name`` ("size", "nonzeros", "flops", "latency", "metric"), as the
        search minimizes it: the metric (higher is better) negated."""
        value = float(getattr(self, OBJECTIVE_FIELDS[name]))
        return -value if name == "metric" else value

    @property
    def bits_per_weight(self) -> float:
        """The file's bits per weight of the compressible layers (what ``MaxBits`` bounds)."""
        return self.size_bytes * 8 / max(1, self.weight_params)


class _Unset:
    """A :class:`TrialAttrs` field that is not written (distinct from one written as None)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _key(name: str, encode: Any = None, decode: Any = None) -> Any:
    return field(default=UNSET, metadata={"key": name, "encode": encode, "decode": decode})


@dataclass
class TrialAttrs:
    """The user attributes of one trial: the one schema the evaluators write, the loop completes
    and the reports read. Fields left :data:`UNSET` are not written; :meth:`from_trial` reads
    absent keys as None. The keys are :mod:`tightfit.run_dir`'s; the field order is the order
    they are written in."""

    screen_constraints: list[float] | None = _key(keys.SCREEN_CONSTRAINTS_ATTR)
    screen_prediction: list[float] | None = _key(keys.SCREEN_PREDICTION_ATTR)
    plan: Plan | None = _key(keys.PLAN_ATTR, Plan.to_dict, Plan.from_dict)
    measurement: Measurement | None = _key(keys.MEASUREMENT_ATTR, Measurement.to_dict, Measurement.from_dict)
    finetune_steps: int | None = _key(keys.FINETUNE_STEPS_ATTR)
    #: seconds the trial's fine-tuning took (the run's time breakdown)
    finetune_s: float | None = _key(keys.FINETUNE_S_ATTR)
    #: standard error of the metric's drop from the original, paired (the noise a GP model reads)
    metric_se: float | None = _key(keys.METRIC_SE_ATTR)
    #: the spread of predicted constraint values (screened / stopped trials; the final pick reads it)
    prediction_se: float | None = _key(keys.PREDICTION_SE_ATTR)
    val_samples: int | None = _key(keys.VAL_SAMPLES_ATTR)
    fidelity: str | None = _key(keys.FIDELITY_ATTR)
    stop_reason: str | None = _key(keys.STOP_REASON_ATTR)
    stage_reached: float | None = _key(keys.STAGE_REACHED_ATTR)
    sequential: dict[str, Any] | None = _key(keys.SEQUENTIAL_ATTR)
    evaluations: list[dict[str, Any]] | None = _key(keys.EVALUATIONS_ATTR)
    curve: dict[str, Any] | None = _key(keys.CURVE_ATTR)
    recovery: dict[str, Any] | None = _key(keys.RECOVERY_ATTR)
    probe_samples: int | None = _key(keys.PROBE_SAMPLES_ATTR)
    probe_s: float | None = _key(keys.PROBE_S_ATTR)
    error: str | None = _key(keys.ERROR_ATTR)
    traceback: str | None = _key(keys.TRACEBACK_ATTR)
    duration_s: float | None = _key(keys.DURATION_ATTR)
    search_time_s: float | None = _key(keys.SEARCH_TIME_ATTR)
    worker: str | None = _key(keys.WORKER_ATTR)
    interrupted: bool | None = _key(keys.INTERRUPTED_ATTR)
    retry_of: int | None = _key(keys.RETRY_OF_ATTR)

    def to_user_attrs(self) -> dict[str, Any]:
        """The JSON-ready attributes to store on the trial (UNSET fields left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is UNSET:
                continue
            encode = f.metadata["encode"]
            out[f.metadata["key"]] = encode(value) if encode is not None and value is not None else value
        return out

    @classmethod
    def from_user_attrs(cls, attrs: Mapping[str, Any]) -> TrialAttrs:
        values = {}
        for f in fields(cls):
            value = attrs.get(f.metadata["key"])
            decode = f.metadata["decode"]
            values[f.name] = decode(value) if decode is not None and value is not None else value
        return cls(**values)

    @classmethod
    def from_trial(cls, trial: Any) -> TrialAttrs:
        """The attributes stored on ``trial`` (an Optuna trial or frozen trial)."""
        return cls.from_user_attrs(trial.user_attrs)


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
    #: standard error of ``measurement.metric``'s drop from the original, paired over the same
    #: validation samples (the metric's own with a ``MinMetric``); for a cheap evaluation's
    #: "stopped" trial, the spread of its predicted constraint values
    metric_se: float | None = None
    #: "full"; with cheap evaluation also "screen" (only screened), "stopped" (fine-tune stopped
    #: at a stage) or "capped" (read up to ``Sequential.trial_samples`` undecided); none of them is
    #: the answer (``NOT_ANSWERS``) unless a verification after the search makes it "full"
    fidelity: str | None = None
    #: the optimizer's own time to make this trial's suggestion (seconds; includes its probes)
    search_time_s: float | None = None
    #: validation samples and seconds the optimizer's probes (no fine-tune) used for this suggestion
    probe_samples: int | None = None
    probe_s: float | None = None
    #: seconds the trial's fine-tuning took
    finetune_s: float | None = None

    @property
    def feasible(self) -> bool:
        # a screened candidate's constraint values may be predictions, a capped one's are estimates
        # on a subsample (cheap evaluation): neither is decided
        return (
            self.state == "COMPLETE"
            and self.fidelity not in ("screen", "capped")
            and all(c <= 0 for c in self.constraints)
        )


def better(a: TrialRecord, b: TrialRecord | None) -> bool:
    """Smaller objective wins; ties go to the higher metric, then the smaller file, then the earlier trial."""
    if b is None:
        return True
    if a.objective is None or b.objective is None:
        return b.objective is None
    if a.objective != b.objective:
        return a.objective < b.objective
    # objectives are compared only between measured trials (best_feasible's candidates)
    am, bm = a.measurement, b.measurement
    if am is not None and bm is not None and am.metric != bm.metric:
        return am.metric > bm.metric
    if am is not None and bm is not None and am.size_bytes != bm.size_bytes:
        return am.size_bytes < bm.size_bytes
    return a.number < b.number


#: cheap evaluation's fidelities that are never the answer: only screened, stopped mid-fine-tune, or
#: capped undecided (see ``TrialRecord.fidelity``)
NOT_ANSWERS = ("screen", "stopped", "capped")


def best_feasible(trials: Sequence[TrialRecord]) -> TrialRecord | None:
    best = None
    for t in trials:
        if t.feasible and t.measurement is not None and t.fidelity not in NOT_ANSWERS and better(t, best):
            best = t
    return best


def pareto_front(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Completed trials not dominated in (metric up, size down), sorted by size."""
    done = [(t, t.measurement) for t in trials if t.state == "COMPLETE" and t.measurement is not None]
    front = []
    for t, m in done:
        dominated = any(
            o.metric >= m.metric
            and o.size_bytes <= m.size_bytes
            and (o.metric > m.metric or o.size_bytes < m.size_bytes)
            for _, o in done
        )
        if not dominated:
            front.append((t, m))
    return [t for t, _ in sorted(front, key=lambda pair: (pair[1].size_bytes, -pair[1].metric))]


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
    #: with ``recover=``: the answer's metric in the search, before its recovery after the search
    #: (``metric`` is after); None without it
    metric_before_recovery: float | None = None
    #: with ``recover=``: each recovered trial's metric before and after, and which was chosen
    recovery: dict[str, Any] | None = None

    @property
    def compression_ratio(self) -> float:
        """Bytes of the original float32 model file over bytes of the compressed one."""
        return self.baseline_size_bytes / max(1, self.size_bytes)
