"""tightfit: fit a trained PyTorch network into a budget.

The public surface is listed in ``__all__``; submodules load on first use, so ``import tightfit``
is fast and changes no global state.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # running a search
    "compress": "tightfit.pipeline",
    "compress_once": "tightfit.run",
    "Result": "tightfit.records",
    "TrialRecord": "tightfit.records",
    "Measurement": "tightfit.records",
    # operators and plans
    "Compose": "tightfit.operators",
    "Prune": "tightfit.operators",
    "Quantize": "tightfit.operators",
    "Operator": "tightfit.operators",
    "Hyperparameter": "tightfit.operators",
    "Plan": "tightfit.operators",
    "apply": "tightfit.operators",
    "register_operator": "tightfit.operators",
    # evaluation
    "Accuracy": "tightfit.evaluation",
    "Constraint": "tightfit.evaluation",
    "MaxDrop": "tightfit.evaluation",
    "MaxSize": "tightfit.evaluation",
    "MaxLatency": "tightfit.evaluation",
    "MaxBits": "tightfit.evaluation",
    "MaxFlops": "tightfit.evaluation",
    # speed: structural operators, latency, verified export
    "StructuredPrune": "tightfit.operators",
    "LowRank": "tightfit.operators",
    "Int8": "tightfit.operators",
    "Latency": "tightfit.measure",
    "export_model": "tightfit.export",
    "MinMetric": "tightfit.evaluation",
    "Agreement": "tightfit.evaluation",
    "Fidelity": "tightfit.evaluation",
    "PerSample": "tightfit.evaluation",
    "Sequential": "tightfit.evaluation",
    "Certificate": "tightfit.evaluation",
    # recovery
    "FineTune": "tightfit.recovery",
    "LearningCompression": "tightfit.recovery",
    "PruneSplice": "tightfit.recovery",
    "GradualPrune": "tightfit.recovery",
    "prune_and_adjust": "tightfit.iterative",
    "SparseTraining": "tightfit.recovery",
    "ProxConnect": "tightfit.recovery",
    "Tuned": "tightfit.recovery",
    # files
    "save": "tightfit._files",
    "load": "tightfit._files",
    # analysis
    "analyze": "tightfit.measure",
    # errors
    "TightfitError": "tightfit.errors",
    "ConfigError": "tightfit.errors",
    "ModelError": "tightfit.errors",
    "EvaluationError": "tightfit.errors",
    "ArtifactError": "tightfit.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tightfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from ._files import load, save
    from .errors import ArtifactError, ConfigError, EvaluationError, ModelError, TightfitError
    from .evaluation import (
        Accuracy,
        Agreement,
        Certificate,
        Constraint,
        Fidelity,
        MaxBits,
        MaxDrop,
        MaxFlops,
        MaxLatency,
        MaxSize,
        MinMetric,
        PerSample,
        Sequential,
    )
    from .export import export_model
    from .iterative import prune_and_adjust
    from .measure import Latency, analyze
    from .operators import (
        Compose,
        Hyperparameter,
        Int8,
        LowRank,
        Operator,
        Plan,
        Prune,
        Quantize,
        StructuredPrune,
        apply,
        register_operator,
    )
    from .pipeline import compress
    from .records import Measurement, Result, TrialRecord
    from .recovery import FineTune, GradualPrune, LearningCompression, ProxConnect, PruneSplice, SparseTraining, Tuned
    from .run import compress_once
