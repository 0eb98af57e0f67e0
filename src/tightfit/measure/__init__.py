"""Measurements of a model: what it holds, nonzeros, FLOPs (sizes live with the artifact format)."""

from .analysis import (
    COMPRESSIBLE_TYPES,
    LayerInfo,
    ModelAnalysis,
    SkippedModule,
    analyze,
    call_model,
    count_nonzeros,
    layer_flops,
    sparse_flops,
)

__all__ = [
    "COMPRESSIBLE_TYPES",
    "LayerInfo",
    "ModelAnalysis",
    "SkippedModule",
    "analyze",
    "call_model",
    "count_nonzeros",
    "layer_flops",
    "sparse_flops",
]
