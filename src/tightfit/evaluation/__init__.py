"""How a compressed model is scored (metrics) and judged (constraints)."""

from .constraints import Constraint, MaxDrop, MaxLatency, MaxSize, MinMetric
from .metrics import Accuracy, evaluate_metric

__all__ = ["Accuracy", "Constraint", "MaxDrop", "MaxLatency", "MaxSize", "MinMetric", "evaluate_metric"]
