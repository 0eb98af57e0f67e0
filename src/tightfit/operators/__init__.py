"""Compression operators, their composition, and plans (what was done to which layer)."""

from .base import Hyperparameter, Operator, Projection
from .compose import Compose, as_strategy
from .plan import OPERATOR_REGISTRY, Plan, apply, apply_plan_inplace, register_operator
from .prune import Prune, WeightMask, magnitude_mask
from .quantize import FakeQuantize, Quantize

register_operator(Prune)
register_operator(Quantize)

__all__ = [
    "OPERATOR_REGISTRY",
    "Compose",
    "FakeQuantize",
    "Hyperparameter",
    "Operator",
    "Plan",
    "Projection",
    "Prune",
    "Quantize",
    "WeightMask",
    "apply",
    "apply_plan_inplace",
    "as_strategy",
    "magnitude_mask",
    "register_operator",
]
