"""Compression operators, their composition, and plans (what was done to which layer)."""

from .base import Hyperparameter, Operator, Projection
from .calibrated import REPAIRS, Calibrated, apply_plan_calibrated, reestimate_batchnorm
from .compose import Compose, as_strategy
from .int8 import Int8, Int8Weights, int8_layers
from .lowrank import LowRank
from .plan import OPERATOR_REGISTRY, Plan, apply, apply_plan_inplace, register_operator
from .prune import Prune, WeightMask, magnitude_mask
from .quantize import FakeQuantize, Quantize
from .structured import StructuredPrune

register_operator(Prune)
register_operator(Quantize)
register_operator(StructuredPrune)
register_operator(LowRank)
register_operator(Int8)

__all__ = [
    "REPAIRS",
    "Calibrated",
    "apply_plan_calibrated",
    "reestimate_batchnorm",
    "OPERATOR_REGISTRY",
    "Compose",
    "FakeQuantize",
    "Hyperparameter",
    "Int8",
    "Int8Weights",
    "LowRank",
    "Operator",
    "Plan",
    "Projection",
    "Prune",
    "Quantize",
    "StructuredPrune",
    "WeightMask",
    "apply",
    "apply_plan_inplace",
    "as_strategy",
    "magnitude_mask",
    "int8_layers",
    "register_operator",
]
