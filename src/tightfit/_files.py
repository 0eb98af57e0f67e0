"""``tightfit.save`` and ``tightfit.load``."""

from __future__ import annotations

import os

from torch import nn

from ._io import write_atomic
from .errors import ConfigError
from .export.artifact import Factory, load_model, save_model
from .operators.plan import Plan
from .records import Result


def save(obj: Result | nn.Module, path: str | os.PathLike, *, plan: Plan | None = None) -> int:
    """Write a compressed model file; returns its size in bytes.

    ``obj`` is a :class:`Result` (its chosen model, byte for byte the file whose size it reports) or
    a model compressed with :func:`tightfit.apply` (quantized weights are packed at their bit width;
    a plain model is stored as float32, sparsely where it has zeros).
    """
    if isinstance(obj, Result):
        if obj.artifact is None:
            return save_model(obj.model, path, None)
        write_atomic(path, obj.artifact)
        return len(obj.artifact)
    if isinstance(obj, nn.Module):
        return save_model(obj, path, plan)
    raise ConfigError(f"tightfit.save takes a Result or an nn.Module, but got {type(obj).__name__}.")


def load(path: str | os.PathLike, model: nn.Module | None = None, *, factory: Factory | None = None) -> nn.Module:
    """Read a ``.tfz`` file into a model in eval mode, unpickling nothing.

    - ``tightfit.load(path)``: a model made of ``torch.nn`` layers and containers (``Sequential``,
      ``ModuleList``, ``ModuleDict``; ``Linear``, ``Conv*``, norms, ``Embedding``, ``LSTM``, ...)
      is rebuilt from the file's architecture, stored as data.
    - ``tightfit.load(path, model=fresh)``: a model of your own classes; ``fresh`` is a new
      instance of the original architecture (it is not changed: a copy is loaded), on which the
      plan's structural steps (structured pruning, low rank) are replayed. ``factory=`` instead: a
      zero-argument callable, or a ``"module:function"`` path, that builds one.
    - A format-1 file (before tightfit stored its architecture as data) holds a pickled module,
      which is never read: load it with ``model=`` or ``factory=``.

    A damaged or crafted file raises :class:`tightfit.errors.ArtifactError` naming the part at
    fault. See :func:`tightfit.export.load_model`.
    """
    return load_model(path, model, factory=factory)
