"""Model inputs taken from a labelled loader: calibration data for calibrated operators."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..calling import inputs_only
from ..errors import ConfigError


def _first_samples(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _first_samples(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_first_samples(v, n) for v in batch)
    return batch


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return None


def loader_inputs(loader: Iterable, max_samples: int | None = None) -> list[Any]:
    """The model inputs of ``loader``'s batches, labels stripped (``(x, y)`` gives ``x``; a dict loses
    its ``labels``), read once in order and kept as a list, up to ``max_samples`` samples (the last
    batch cut). A tightfit metric (``Accuracy(loader)``) gives its loader's inputs. For
    ``compress(..., calibration=loader_inputs(train_loader, max_samples=256))``."""
    loader = getattr(loader, "loader", loader)  # a PerSampleMetric holds its loader
    if loader is None or not hasattr(loader, "__iter__") or isinstance(loader, (torch.Tensor, dict)):
        raise ConfigError(f"loader_inputs: `loader` must be an iterable of batches, but got {type(loader).__name__}.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ConfigError(f"loader_inputs: `max_samples` must be a whole number >= 1 or None, but got {max_samples!r}.")
    out: list[Any] = []
    taken = 0
    for batch in loader:
        inputs = inputs_only(batch)
        size = _batch_size(inputs)
        if max_samples is not None and size is not None and taken + size > max_samples:
            out.append(_first_samples(inputs, max_samples - taken))
            break
        out.append(inputs)
        taken += size or 1
        if max_samples is not None and taken >= max_samples:
            break
    return out
