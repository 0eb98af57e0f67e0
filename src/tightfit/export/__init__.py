"""The compressed-model file (save, load, exact size) and verified export to ONNX/TorchScript."""

from .artifact import bake, load_model, read_manifest, save_model, size_bytes, to_bytes
from .verified import ExportCheckError, ExportReport, export_model, export_run

__all__ = [
    "ExportCheckError",
    "ExportReport",
    "bake",
    "export_model",
    "export_run",
    "load_model",
    "read_manifest",
    "save_model",
    "size_bytes",
    "to_bytes",
]
