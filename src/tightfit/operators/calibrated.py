"""Applying a plan with calibration data: layer by layer, each layer compressed from the inputs it
sees once the layers before it are compressed (as GPTQ and SparseGPT do), then cheap repairs.

For each layer a calibrated operator compresses, in the order the layers run, the calibration
batches go through the partly compressed model with a hook on that layer summing its inputs
(:mod:`tightfit.operators.calibration`; a pass ends at the layer when it runs once per forward);
then the layer's operators apply, and its statistics are dropped. Cost: one pass over the
calibration data per such layer (measured in docs/calibration.md); memory: one layer's statistics.
Where the layers sit in a list of blocks run in turn (a transformer's), each pass runs only the
layer's block on its cached inputs (:mod:`tightfit.operators.blocks`; checked to give the same
inputs first), plus one block's inputs in memory.

Where the result lives: a calibrated quantizer writes its compensated weight (the exact values of
its codes) under the layer's parametrizations and registers a :class:`FakeQuantize` whose grid
(scales, zero points) is fixed to the one it found, so the layer computes exactly those codes and
the file stores them; fine-tuning later trains the weight underneath and re-rounds it on that fixed
grid (straight-through), as quantization-aware training does, rather than freezing it. SparseGPT
likewise writes its updated weights under a fixed mask.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..measure.analysis import MATRIX_KIND, layer_kind, tied_groups
from .base import Operator
from .blocks import BlockCursor, choose_blocks, no_kv_cache, survey
from .calibration import LayerStats, LayerView, StopPass, collect_stats, run, why_not_calibrated
from .compose import Compose
from .plan import Plan, apply_plan_inplace, share_tied_parametrizations
from .prune import WeightMask
from .quantize import FakeQuantize
from .solvers import SingularHessian, awq_column_scale, gptq, original_target, sparsegpt, wanda_mask

#: Repairs :func:`apply_plan_calibrated` knows: BatchNorm statistics re-estimated on the calibration
#: data, and bias correction (the mean output shift each compressed layer causes, added to its bias).
REPAIRS = ("batchnorm", "bias")


@dataclass
class Calibrated:
    """What calibrated compression did: the model, which layers fell back to the data-free method
    and why, what was repaired, and what it cost."""

    model: nn.Module
    plan: Plan
    uncalibrated: dict[str, str] = field(default_factory=dict)  # layer -> why rounded / pruned by magnitude
    left_alone: dict[str, str] = field(default_factory=dict)  # module -> why no operator compresses it
    repaired: dict[str, list[str]] = field(default_factory=dict)  # repair -> modules it changed
    not_repaired: dict[str, str] = field(default_factory=dict)  # layer -> why no bias correction
    not_fitted: dict[str, str] = field(default_factory=dict)  # layer -> why target="original" did not fit it
    calibration_passes: int = 0  # passes over the calibration batches (one per calibrated layer, + repairs)
    block_passes: int = 0  # of those, passes that ran only the layer's block on its cached inputs (blocks.py)
    blocks: str = ""  # the nn.ModuleList whose blocks' inputs were cached, or "" (every pass ran the whole model)
    blocks_not_cached: str = ""  # why no block's inputs were cached
    seconds: float = 0.0


def quantize_layer(op: Any, module: nn.Module, settings: dict[str, Any], view: LayerView, stats: LayerStats) -> None:
    """GPTQ (or round-to-nearest with AWQ scaling) of one layer; see the module docstring."""
    bits, group_size = int(settings["bits"]), int(settings.get("group_size", 0) or 0)
    matrix, hessian = view.matrix(), stats.hessian
    column_scale = None
    if op.awq and view.groups == 1:  # one scale per input column: a grouped conv's groups see different inputs
        column_scale = awq_column_scale(matrix, hessian, stats.abs_mean, bits, group_size, op.symmetric)
        if op.method == "rtn":
            parametrize.register_parametrization(
                module, "weight", FakeQuantize(bits, group_size, op.symmetric, column_scale=column_scale)
            )
            return
        matrix = matrix * column_scale
        hessian = hessian / (column_scale[:, None] * column_scale[None, :])
    keep = (matrix != 0).to(matrix.dtype) if parametrize.is_parametrized(module, "weight") else None
    quantized, scale, zero = gptq(
        matrix,
        hessian,
        bits,
        group_size=group_size,
        symmetric=op.symmetric,
        act_order=op.act_order,
        percdamp=op.percdamp,
        keep=keep,
    )
    if column_scale is not None:
        quantized = quantized * (1.0 / column_scale)
    view.write(quantized)
    rows = module.weight.shape[0]
    step = FakeQuantize(
        bits,
        group_size,
        op.symmetric,
        scale=scale.reshape(rows, -1),
        zero=None if zero is None else zero.reshape(rows, -1),
        column_scale=column_scale,
    )
    parametrize.register_parametrization(module, "weight", step)


def prune_layer(op: Any, module: nn.Module, settings: dict[str, Any], view: LayerView, stats: LayerStats) -> None:
    """Wanda or SparseGPT pruning of one layer."""
    sparsity, matrix = float(settings["sparsity"]), view.matrix()
    if op.method == "wanda":
        mask = wanda_mask(matrix, stats.square_total, sparsity, op.pattern)
    else:
        pruned, mask = sparsegpt(matrix, stats.hessian, sparsity, pattern=op.pattern, percdamp=op.percdamp)
        view.write(pruned)
    parametrize.register_parametrization(module, "weight", WeightMask(view.to_weight(mask), op.pattern))


def calibration_batches(calibration: Any, strategy: Compose) -> list[Any]:
    users = [op for op in strategy if op.needs_calibration()]
    who = ", ".join(repr(op) for op in users) or "the repairs"
    if calibration is None:
        raise ConfigError(
            f"{who} need(s) `calibration`: an iterable of model inputs (each a tensor, a tuple of "
            "arguments or a dict of keyword arguments, as `example_input`), e.g. 128-512 samples."
        )
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise ConfigError(
            f"`calibration` must be an iterable of batches of model inputs (a list, a DataLoader "
            f"yielding inputs), but got {type(calibration).__name__}; wrap one batch as [batch]."
        )
    batches = list(calibration)
    if not batches:
        raise ConfigError("`calibration` holds no batch; give a few hundred samples of model inputs.")
    return batches


def _device_batches(batches: list[Any], device: torch.device) -> list[Any]:
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        return value

    return [move(b) for b in batches]


def check_repairs(repair: Iterable[str]) -> tuple[str, ...]:
    repair = (repair,) if isinstance(repair, str) else tuple(repair)
    unknown = [r for r in repair if r not in REPAIRS]
    if unknown:
        raise ConfigError(f"`repair` items must be drawn from {REPAIRS}, but got {unknown}.")
    return repair


def _targets(model: nn.Module, layer_names: Iterable[str]) -> dict[str, tuple[str, nn.Module]]:
    """Module name -> (plan layer it belongs to, module): the layer itself, or the compressible
    layers inside it where a structural operator replaced it by a container (low rank)."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for layer in layer_names:
        module = model.get_submodule(layer) if layer else model
        if layer_kind(module) is not None:
            out[layer] = (layer, module)
        else:
            for sub_name, sub in module.named_modules():
                if sub_name and layer_kind(sub) is not None:
                    out[f"{layer}.{sub_name}"] = (layer, sub)
    return out


def apply_plan_calibrated(
    plan: Plan,
    model: nn.Module,
    calibration: Any,
    strategy: Compose | None = None,
    *,
    repair: Iterable[str] = ("batchnorm",),
    block_cache: bool = True,
    original: nn.Module | None = None,
) -> Calibrated:
    """Apply ``plan`` to ``model`` itself, its calibrated operators fed with ``calibration`` (see
    the module docstring), then the ``repair`` steps (:data:`REPAIRS`). Bad input is refused before
    any work. ``block_cache=False`` runs the whole model for every layer's statistics, even where
    cached block inputs give the same (:mod:`tightfit.operators.blocks`). ``original``: the
    uncompressed model that layers with ``target="original"`` fit to (run in eval mode, not
    changed; default: a copy of ``model`` as given). Returns what was done (:class:`Calibrated`)."""
    start = time.perf_counter()
    strategy = strategy or plan.strategy()
    repair = check_repairs(repair)
    batches = calibration_batches(calibration, strategy)
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "meta":
        raise ConfigError("The model's weights are on the 'meta' device (not loaded); calibration needs real weights.")
    batches = _device_batches(batches, parameter.device if parameter is not None else torch.device("cpu"))
    per_layer = _entries(plan, strategy)
    calibrated = {
        name
        for name, ops in per_layer.items()
        if any((op.needs_calibration() or "bias" in repair) and s != op.identity() for op, s in ops)
    }
    reference = None
    if any(_fits_original(per_layer[name]) for name in calibrated):  # layers fit to its outputs
        reference = original if original is not None else copy.deepcopy(model)
    apply_plan_inplace(plan, model, strategy, structure_only=True)
    result = Calibrated(model, plan)
    for name, ops in per_layer.items():  # data-free layers first: they need no pass
        if name not in calibrated:
            for op, settings in ops:
                op.apply_to_model(model, {name: settings})
    was_training, reference_was_training = model.training, reference is not None and reference.training
    model.eval()
    try:
        with no_kv_cache(model), no_kv_cache(reference) if reference is not None else contextlib.nullcontext():
            if reference is not None:
                reference.eval()
            _calibrate_layers(model, per_layer, calibrated, batches, repair, result, block_cache, reference)
        share_tied_parametrizations(model)
        if "batchnorm" in repair:
            result.repaired["batchnorm"] = reestimate_batchnorm(model, batches)
            result.calibration_passes += bool(result.repaired["batchnorm"])
    finally:
        model.train(was_training)
        if reference is not None:
            reference.train(reference_was_training)
    result.seconds = time.perf_counter() - start
    return result


def _entries(plan: Plan, strategy: Compose) -> dict[str, list[tuple[Operator, dict[str, Any]]]]:
    """Layer -> its weight-level operators with validated settings, in strategy order."""
    per_layer: dict[str, list[tuple[Operator, dict[str, Any]]]] = {}
    for op in strategy:
        if op.structural:
            continue
        for layer_name, per_op in plan.layers.items():
            if op.name in per_op:
                per_layer.setdefault(layer_name, []).append((op, op.validate_settings(layer_name, per_op[op.name])))
    return per_layer


def _calibrate_layers(
    model: nn.Module,
    per_layer: dict,
    calibrated: set[str],
    batches: list[Any],
    repair: tuple[str, ...],
    result: Calibrated,
    block_cache: bool = True,
    reference: nn.Module | None = None,
) -> None:
    targets = _targets(model, sorted(calibrated))
    tied = {name for leader, followers in tied_groups(model).items() for name in (leader, *followers)}
    renorm = _renormalizes_between_layers(model, per_layer, calibrated, repair)
    order, calls, blocks = _layer_order(
        model, {n: m for n, (_, m) in targets.items()}, batches, block_cache, renorm, result
    )
    passes = _Passes(model, batches, calls, BlockCursor(model, blocks, batches), result)
    if reference is not None:
        passes.original = _ReferenceRunner(reference, blocks, batches)
    stale = renorm  # the repaired model's statistics are the calibration data's, from the first layer on
    for name in order:
        layer, module = targets[name]
        why = why_not_calibrated(module)
        if why is None and name in tied:
            why = "its weight is shared with other layers (tied); an update from one layer's inputs would change the others"
        if why is None and calls[name] == 0:
            why = "it does not run on the calibration data"
        if why is not None and any(op.needs_calibration() for op, _ in per_layer[layer]):
            result.uncalibrated[name] = why
        elif why is not None:
            result.not_repaired[name] = why
        view = LayerView(module) if why is None else None
        stats = passes.read(name, view, per_layer[layer], stale) if view is not None else None
        _apply_layer(name, module, per_layer[layer], view, stats, repair, result)
        stale = renorm


def _layer_order(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[Any],
    block_cache: bool,
    renorm: bool,
    result: Calibrated,
) -> tuple[list[str], dict[str, int], Any]:
    """The layers in the order they run (those that never run last), how often each runs per
    forward, and the blocks whose inputs are cached (None: whole-model passes; why in ``result``)."""
    blocks = choose_blocks(list(modules), model) if block_cache and not renorm else None
    order, calls, why = survey(model, modules, batches[0], blocks)
    if why is not None or blocks is None:
        why = why or (
            "block_cache=False"
            if not block_cache
            else "BatchNorm statistics are re-estimated between layers (whole-model passes)"
            if renorm
            else "no nn.ModuleList holds a calibrated layer"
        )
        blocks, result.blocks_not_cached = None, why
    result.blocks = blocks.name if blocks is not None else ""
    order += [name for name in modules if name not in order]  # never runs on the calibration data
    return order, calls, blocks


@dataclass
class _Passes:
    """What reads a layer's statistics: the partly compressed model and its block cursor, how often
    each layer runs per forward, and the original model's runner where layers fit to it."""

    model: nn.Module
    batches: list[Any]
    calls: dict[str, int]
    cursor: BlockCursor
    result: Calibrated
    original: _ReferenceRunner | None = None

    def read(self, name: str, view: LayerView, ops: list[tuple[Operator, dict[str, Any]]], stale: bool) -> LayerStats:
        """One pass of the calibration data for ``name``'s statistics (after re-estimating the
        BatchNorms before it where ``stale``), counted in the result."""
        module, once = view.module, self.calls[name] == 1
        if stale:  # passes end at the layer where it runs once: the BatchNorms after it wait
            reestimate_batchnorm(self.model, self.batches, until=module if once else None)
            self.result.calibration_passes += 1
        fit = self.original is not None and _fits_original(ops)
        at = self.original.at(name, module) if fit and self.original is not None else None
        if fit and at is None:
            self.result.not_fitted[name] = (
                "the original model has no layer of its kind and shape there (a structural operator changed it)"
            )
        gram = fit or any(op.needs_calibration() and getattr(op, "method", "") != "wanda" for op, _ in ops)
        runner = self.cursor.runner(name)
        stats = collect_stats(self.model, view, self.batches, gram=gram, stop_early=once, runner=runner, reference=at)
        self.result.calibration_passes += 1
        self.result.block_passes += runner is not None
        return stats


def _fits_original(ops: list[tuple[Operator, dict[str, Any]]]) -> bool:
    return any(getattr(op, "target", "layer") == "original" and s != op.identity() for op, s in ops)


def _same_inputs(original: nn.Module, module: nn.Module) -> bool:
    """Whether ``original`` sees the inputs ``module`` sees, as the same rows: the same layer, or a
    matrix layer stored input-major (GPT-2's ``Conv1D``) that ``module`` runs as an ``nn.Linear``."""
    weight = getattr(original, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if type(original) is type(module):
        return weight.shape == module.weight.shape
    matrix = isinstance(module, nn.Linear) and layer_kind(original) == MATRIX_KIND
    return matrix and weight.numel() == module.weight.numel()


class _ReferenceRunner:
    """Runs the calibration batches through the original model (``target="original"``), up to the
    module at a layer's place: whole, or its block on cached inputs where the compressed model's
    passes use the block cache, so both advance block by block together."""

    def __init__(self, reference: nn.Module, blocks: Any, batches: list[Any]) -> None:
        self.reference, self.batches = reference, batches
        own = None
        if blocks is not None:
            own = type(blocks)(blocks.name, list(reference.get_submodule(blocks.name)))
        self.cursor = BlockCursor(reference, own, batches)

    def at(self, name: str, module: nn.Module) -> tuple[Any, nn.Module] | None:
        """(runner of batch i, the original module at ``name``), or None where the original has no
        module of the same kind and shape there (a structural operator changed it)."""
        try:
            original = self.reference.get_submodule(name)
        except AttributeError:
            return None
        if not _same_inputs(original, module):
            return None
        runner = self.cursor.runner(name)
        return (runner if runner is not None else lambda i: run(self.reference, [self.batches[i]])), original


def _renormalizes_between_layers(
    model: nn.Module, per_layer: dict, calibrated: set[str], repair: tuple[str, ...]
) -> bool:
    """Whether BatchNorm statistics are re-estimated before each calibrated layer's statistics are
    gathered, so that the layer learns from the inputs the repaired model will give it: where the
    BatchNorms are repaired and a calibrated operator prunes. Pruning shifts the activations a lot
    (magnitude 50% on MobileNetV2: 25.61% test accuracy without re-estimation, 86.12% with), so the
    next layers' inputs in the pass are far from the repaired model's; and the repaired model's
    statistics are the calibration data's, not the stored ones, from the first layer on. Measured
    with and without (docs/calibration.md, "BatchNorm re-estimation inside the pass"): on
    fmnist-resnet Wanda 50% lost 6.76 test points instead of 23.29; on MobileNetV2 SparseGPT 2:4
    lost 2.70 instead of 3.89 (3.19 without the re-estimation before the first layer). GPTQ alone
    moved within the test split's noise (+0.08, -0.07 points), so quantization does not pay the
    extra pass per layer."""
    if "batchnorm" not in repair or not _tracked_batchnorms(model):
        return False
    return any(op.needs_calibration() and op.name == "prune" for name in calibrated for op, _ in per_layer[name])


def _apply_layer(
    name: str,
    module: nn.Module,
    ops: list[tuple[Operator, dict[str, Any]]],
    view: LayerView | None,
    stats: LayerStats | None,
    repair: tuple[str, ...],
    result: Calibrated,
) -> None:
    """The layer's operators, calibrated where ``view`` and ``stats`` are given (after fitting the
    weights to the original model's outputs where ``stats`` hold the cross term), then its bias
    correction."""
    if stats is not None and stats.cross is not None and view is not None:
        damp = min(getattr(op, "fit_damp", 0.01) for op, _ in ops)  # pruning's when a layer is also pruned
        view.write(original_target(view.matrix(), stats.gram, stats.cross, damp))
    before = module.weight.detach().clone() if view is not None and "bias" in repair else None
    for op, settings in ops:
        if not op.needs_calibration():
            op.apply(module, settings)
        elif view is None:
            op.apply_uncalibrated(module, settings)
        else:
            try:  # the solvers raise before the layer is changed
                op.apply_calibrated(module, settings, view, stats)
            except SingularHessian as error:
                fallback = "rounded to nearest" if op.name == "quantize" else "pruned by magnitude"
                result.uncalibrated[name] = f"{error}, so it is {fallback}"
                op.apply_uncalibrated(module, settings)
    if before is not None:
        _correct_bias(name, module, view, before, stats, result)


def _correct_bias(
    name: str, module: nn.Module, view: LayerView, before: torch.Tensor, stats: LayerStats, result: Calibrated
) -> None:
    """Add ``(W - W_compressed) E[x]`` to the bias: the mean output shift compression caused, over
    the calibration inputs the layer sees in the compressed model. Only where a bias exists: adding
    one would change the model's architecture (a fresh model could not load the file)."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        result.not_repaired[name] = "no bias to correct (a BatchNorm after it is re-estimated instead)"
        return
    delta = before.to(torch.float32).reshape(view.groups, -1, stats.mean.shape[-1]) - view.matrix()
    shift = torch.einsum("grc,gc->gr", delta, stats.mean).reshape(-1)
    with torch.no_grad():
        bias.add_(shift.to(bias.dtype))
    result.repaired.setdefault("bias", []).append(name)


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], until: nn.Module | None = None) -> list[str]:
    """Re-estimate every BatchNorm's running statistics on ``batches``: reset, cumulative average
    (momentum None), the model in eval mode except the BatchNorms, no gradients. Returns their
    names. Compression shifts the activations the stored statistics describe; this re-centres them
    without training. ``until``: each pass ends where that module (run once per forward) is about
    to run, so only the BatchNorms before it are estimated; those after it are left reset (the
    layer-by-layer pass re-estimates them before it reads a layer behind them, and at the end)."""
    norms = _tracked_batchnorms(model)
    if not norms:
        return []
    modes = {name: (m.training, m.momentum) for name, m in norms.items()}
    was_training = model.training
    model.eval()
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    handle = until.register_forward_pre_hook(_stop_pass) if until is not None else None
    try:
        run(model, batches)
    finally:
        if handle is not None:
            handle.remove()
        for name, m in norms.items():
            m.train(modes[name][0])
            m.momentum = modes[name][1]
        model.train(was_training)
    return sorted(norms)


def _tracked_batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorms that keep running statistics, by name: what the repair re-estimates."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def _stop_pass(module: nn.Module, args: tuple) -> None:
    raise StopPass


def refuse_uncalibrated(strategy: Compose) -> None:
    """Refuse, before any work, a strategy whose operators need calibration data where none can be
    given (``tightfit.compress`` does not take it yet)."""
    users = [op for op in strategy if op.needs_calibration()]
    if users:
        raise ConfigError(
            f"{', '.join(repr(op) for op in users)} need(s) calibration data, which tightfit.compress does not "
            "take yet: compress one-shot with tightfit.compress_once(model, strategy, calibration=batches), "
            "or search with method='rtn' / 'magnitude'."
        )
