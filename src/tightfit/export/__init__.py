"""The compressed-model file: save, load, and its exact size."""

from .artifact import bake, load_model, read_manifest, save_model, size_bytes, to_bytes

__all__ = ["bake", "load_model", "read_manifest", "save_model", "size_bytes", "to_bytes"]
