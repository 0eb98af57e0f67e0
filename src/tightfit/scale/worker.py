"""A worker: a process that joins a study in a shared storage and evaluates its trials."""

from __future__ import annotations

from typing import Any

from torch import nn


def work(model: nn.Module, *, storage: Any, study_name: str = "tightfit", **arguments: Any) -> int:
    """Evaluate trials of the study ``study_name`` in ``storage`` until its budget is used up;
    returns how many this process evaluated.

    ``arguments`` are those of :func:`tightfit.compress` (``evaluate``, ``strategy``, ``budget``,
    ``seed``...), and must match the ones the study was started with (checked). The study is created
    if no one has yet. A worker never writes a run directory and does not pick the result: the
    process that runs ``compress`` (``tightfit run``) or ``tightfit report`` does.
    """
    from ..run import Run, Settings

    for local_only in ("run_dir", "progress", "on_start"):
        arguments.pop(local_only, None)
    return Run(model, Settings.of(storage=storage, study_name=study_name, **arguments), worker=True).work()
