"""Measurements of a model: what it holds, nonzeros, FLOPs (sizes live with the artifact format)."""

from .analysis import (
    COMPRESSIBLE_TYPES,
    ELEMENTWISE_KINDS,
    EMBEDDING_KIND,
    MATRIX_KIND,
    RECURRENT_KINDS,
    LayerInfo,
    ModelAnalysis,
    SkippedModule,
    analyze,
    call_model,
    count_nonzeros,
    layer_flops,
    layer_kind,
    sparse_flops,
    weight_names,
)
from .latency import Latency, LatencyResult, architecture_key, with_batch_size

__all__ = [
    "Latency",
    "LatencyResult",
    "architecture_key",
    "with_batch_size",
    "COMPRESSIBLE_TYPES",
    "ELEMENTWISE_KINDS",
    "EMBEDDING_KIND",
    "MATRIX_KIND",
    "RECURRENT_KINDS",
    "LayerInfo",
    "ModelAnalysis",
    "SkippedModule",
    "analyze",
    "call_model",
    "count_nonzeros",
    "layer_flops",
    "layer_kind",
    "sparse_flops",
    "weight_names",
]
