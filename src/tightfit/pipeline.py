"""``tightfit.compress`` (this module is not named compress, so that importing it never shadows
the function on the package): search a compression plan for a trained model under a budget.

The run itself is :class:`tightfit.run.Run`; its arguments are :class:`tightfit.run.Settings`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ConfigError
from .evaluation.sequential import Sequential
from .records import Result, best_feasible, pareto_front
from .run import OBJECTIVES, PICKS, Run, Settings
from .run.measuring import float32_file_bytes
from .run_dir import BASELINE_ATTR, EXAMPLE_INPUT_FILE, SETTINGS_ATTR


def compress(model: nn.Module, **settings: Any) -> Result:
    """Search a compression plan for ``model`` that meets ``constraint`` and minimizes ``objective``.

    ``model`` is never modified. Each of the ``budget`` evaluations applies a plan to a fresh copy,
    runs ``finetune`` (masks and quantization held), measures ``evaluate`` and the saved file's
    bytes. With ``run_dir``, the study (SQLite), every trial, the best model file, a summary and a
    plot are written there, and calling again with the same arguments resumes the search.
    ``storage`` (a URL such as ``postgresql://…`` or a storage from :func:`tightfit.scale.open_storage`)
    puts the study on a database that workers (:func:`tightfit.scale.work`, ``tightfit worker``) share;
    ``on_start(storage_url, study_name)`` is called once the study is open and the baseline stored
    (``tightfit run --workers`` starts its workers there). This call waits for the other workers'
    running trials before it reports. ``objective="latency"`` (or a ``MaxLatency`` constraint) times
    every trial's saved model with ``latency`` (default ``tightfit.Latency(example_input)``); passing
    ``latency`` alone records it.
    With ``evaluation=tightfit.Sequential(...)``, candidates are evaluated on a growing subsample of
    the validation set until a confidence interval decides the constraints, candidates that cannot
    improve the answer are only screened (no fine-tune), and the answer comes with a certificate
    computed on held-out validation samples (``result.certificate``). ``pick`` chooses the answer
    among the feasible trials: ``"posterior"`` (default) the smallest-objective one that a GP model
    of the constraint over all trials also expects to be feasible, so a lucky measurement is not
    the answer (from 20 completed trials on; docs/search.md), ``"observed"`` the best observed
    feasible trial. See the README for the full walk-through.

    The keyword arguments, their types and defaults are :class:`tightfit.run.Settings`'s:
    ``evaluate`` (required), ``strategy=None``, ``constraint=None``, ``objective="size"``,
    ``finetune=None``, ``budget=30``, ``search="auto"``, ``example_input=None``, ``seed=0``,
    ``run_dir=None``, ``storage=None``, ``study_name="tightfit"``, ``progress=False``,
    ``artifact_extra=None``, ``on_start=None``, ``latency=None``, ``evaluation=None``,
    ``pick="posterior"``, ``calibration=None``, ``recover=None``, ``recover_top=1``,
    ``search_constraint=None`` (docs/reference.md).
    """
    return Run(model, Settings.of(**settings)).compress()


def run_arguments(model: nn.Module, **keywords: Any) -> dict[str, Any]:
    """``keywords`` checked against :func:`compress`'s arguments (:class:`~tightfit.run.Settings`),
    with its defaults filled in."""
    del model  # kept in the signature for callers that pass it
    return Settings.of(**keywords).as_dict()


__all__ = [
    "compress",
    "best_feasible",
    "pareto_front",
    "float32_file_bytes",
    "run_arguments",
    "OBJECTIVES",
    "PICKS",
    "EXAMPLE_INPUT_FILE",
    "BASELINE_ATTR",
    "SETTINGS_ATTR",
    "ConfigError",
    "Sequential",
]
