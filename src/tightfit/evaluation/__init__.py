"""How a compressed model is scored (metrics), judged (constraints), and cheaply evaluated
(per-sample statistics, sequential tests, certificates)."""

from .constraints import Constraint, MaxBits, MaxDrop, MaxFlops, MaxLatency, MaxSize, MinMetric
from .data import loader_inputs
from .metrics import Accuracy, Agreement, Fidelity, PerSample, PerSampleMetric, SampleMetric, evaluate_metric
from .sequential import Certificate, Sequential
from .statistics import Estimate, mean_estimate, u_statistic2

__all__ = [
    "Accuracy",
    "Agreement",
    "Certificate",
    "Constraint",
    "Estimate",
    "Fidelity",
    "MaxBits",
    "MaxDrop",
    "MaxFlops",
    "MaxLatency",
    "MaxSize",
    "MinMetric",
    "PerSample",
    "PerSampleMetric",
    "SampleMetric",
    "Sequential",
    "evaluate_metric",
    "loader_inputs",
    "mean_estimate",
    "u_statistic2",
]
