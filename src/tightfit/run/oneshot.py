"""One-shot compression without a search: every layer an operator takes gets its fixed setting,
calibrated operators (GPTQ, Wanda, SparseGPT) learn from calibration data, then cheap repairs run.
It lives with the run (not in operators/) because it builds the same search space a run does."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..measure.analysis import analyze
from ..operators.base import Operator
from ..operators.calibrated import Calibrated, apply_plan_calibrated, calibration_batches, check_repairs
from ..operators.compose import Compose, as_strategy, why_not_taken
from ..operators.plan import Plan, apply_plan_inplace
from ..search.space import build_space


def one_shot_plan(
    model: nn.Module, strategy: Compose | Operator, example_input: Any = None
) -> tuple[Plan, dict[str, str]]:
    """The plan that applies every operator of ``strategy`` at its fixed setting to every layer it
    takes, and the modules it leaves alone with the reason. Each searchable setting must be fixed
    (one value): a range or several choices is refused."""
    strategy = as_strategy(strategy)
    for op in strategy:
        op.prepare(model, example_input)
    analysis = analyze(model)
    space = build_space(strategy, analysis)
    left_alone = {s.name: s.reason for s in analysis.skipped}
    left_alone.update(
        {layer.name: why_not_taken(layer, strategy) for layer in analysis.layers if layer.name not in space.fixed}
    )
    if space.dimensions:
        open_ = sorted({f"{d.operator}.{d.hyperparameter.name}" for d in space.dimensions})
        raise ConfigError(
            f"compress_once applies fixed settings, but {open_} are ranges or choices; give one value "
            "each (e.g. Quantize(bits=4), Prune(sparsity=0.5)), or search them with tightfit.compress."
        )
    return space.plan({}), left_alone


def compress_once(
    model: nn.Module,
    strategy: Compose | Operator,
    calibration: Any = None,
    *,
    example_input: Any = None,
    repair: Iterable[str] | None = None,
) -> Calibrated:
    """Compress ``model`` in one shot, without a search: every layer ``strategy`` takes gets its
    fixed setting (e.g. ``Quantize(bits=4, method="gptq", group_size=128)``), calibrated operators
    learn from ``calibration`` (an iterable of model inputs; a labelled loader: ``[x for x, _ in
    loader]``), then ``repair`` runs (:data:`REPAIRS`; default: BatchNorm re-estimation when
    calibration is given, nothing otherwise; with Wanda or SparseGPT it also runs before each
    calibrated layer is read, docs/calibration.md). ``model`` is not changed; the result holds a
    compressed copy (``result.model``, saved with ``tightfit.save(result.model, path, plan=result.plan)``)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}.")
    strategy = as_strategy(strategy)
    repair = check_repairs(("batchnorm",) if repair is None and calibration is not None else repair or ())
    needs_data = any(op.needs_calibration() for op in strategy) or bool(repair)
    if needs_data:
        calibration = calibration_batches(calibration, strategy)  # refused before any work; a generator is read once
    plan, left_alone = one_shot_plan(model, strategy, example_input)
    compressed = copy.deepcopy(model)
    if calibration is None:
        apply_plan_inplace(plan, compressed, strategy)
        return Calibrated(compressed, plan, left_alone=left_alone)
    result = apply_plan_calibrated(plan, compressed, calibration, strategy, repair=repair, original=model)
    result.left_alone = left_alone
    return result
