"""Where trained task weights live: ``$TIGHTFIT_CACHE/tasks`` or ``~/.cache/tightfit/tasks``.
Weights are state_dicts written with ``torch.save`` and read with ``torch.load(weights_only=True)``
(never a pickled module); each has a JSON sidecar with how it was trained and what it scored."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def cache_dir() -> Path:
    root = os.environ.get("TIGHTFIT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tightfit"
    return base / "tasks"


def weights_path(name: str) -> Path:
    return cache_dir() / f"{name}.pt"


def meta_path(name: str) -> Path:
    return cache_dir() / f"{name}.json"


def is_cached(name: str) -> bool:
    return weights_path(name).is_file() and meta_path(name).is_file()


def save_weights(name: str, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write atomically (temp file then rename) so an interrupted run never leaves a half file
    that a later run would take as cached."""
    path = weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    tmp_meta = meta_path(name).with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_meta, meta_path(name))
    return path


def load_weights(name: str, model: nn.Module) -> nn.Module:
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"No trained weights for task {name!r} at {path}. Train and cache them with: "
            f"python -m benchmarks.tasks.train {name}   (set TIGHTFIT_CACHE to use another cache folder)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_meta(name: str) -> dict[str, Any]:
    return json.loads(meta_path(name).read_text()) if meta_path(name).is_file() else {}
