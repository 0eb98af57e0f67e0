"""How a compressed model is scored (metrics) and judged (constraints)."""

from .constraints import Constraint, MaxDrop, MaxSize, MinMetric
from .metrics import Accuracy, evaluate_metric

__all__ = ["Accuracy", "Constraint", "MaxDrop", "MaxSize", "MinMetric", "evaluate_metric"]
