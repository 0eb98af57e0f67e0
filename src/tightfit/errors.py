"""Exceptions raised by tightfit.

Every member is also a builtin (``ValueError``, ``RuntimeError``) so callers can catch either.
Messages state the rule, the value that broke it, and what to do.
"""

from __future__ import annotations


class TightfitError(Exception):
    """Base class of every error tightfit raises on purpose."""


class ConfigError(TightfitError, ValueError):
    """An argument or config field is invalid; raised before any work starts."""


class ModelError(TightfitError, ValueError):
    """The model cannot be compressed as asked (e.g. it has no compressible layer)."""


class EvaluationError(TightfitError, RuntimeError):
    """The user's evaluation raised or returned something that is not a finite number."""


class ArtifactError(TightfitError, ValueError):
    """A compressed-model file is unreadable, or does not fit the model it is loaded into."""
