"""Input statistics of one layer on calibration data, gathered with a forward hook.

A layer is read as G independent matrix problems (G = a convolution's ``groups``; 1 otherwise):
its effective weight as ``(G, rows, columns)`` and its inputs as rows of ``(G, columns)`` (a
convolution's inputs unfolded into the patches its kernel sees, padded as the layer pads them:
zeros, reflection, replication or circular, ``"same"`` and ``"valid"``). Only one
layer's statistics are held at a time: the Hessian ``H = 2 X^T X / n`` (``columns^2`` floats per
group; a depthwise convolution's is ``k x k``), accumulated batch by batch on the model's device,
and per-input sums (squares for Wanda, magnitudes for AWQ, plain sums for bias correction).
A Linear's padding tokens (where a batch of keyword arguments carries an ``attention_mask``) are
left out: they are not inputs the layer will really see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..measure.analysis import call_model


class StopPass(Exception):
    """Raised by a hook to end a forward pass once the layer it watches has seen its input."""


@dataclass
class LayerStats:
    """Sums over the calibration inputs of one layer, per group: ``(G, C)`` vectors and the
    ``(G, C, C)`` Gram matrix (None when not asked for)."""

    count: int
    total: torch.Tensor
    square_total: torch.Tensor
    abs_total: torch.Tensor
    gram: torch.Tensor | None
    cross: torch.Tensor | None = None  # sum of x_original^T x_compressed, (G, C, C), where a reference model ran

    @classmethod
    def empty(cls, groups: int, columns: int, device: torch.device, gram: bool, cross: bool) -> LayerStats:
        vector, square = (groups, columns), (groups, columns, columns)
        return cls(
            0,
            torch.zeros(vector, device=device),
            torch.zeros(vector, device=device),
            torch.zeros(vector, device=device),
            torch.zeros(square, device=device) if gram else None,
            torch.zeros(square, device=device) if cross else None,
        )

    def add(self, rows: torch.Tensor, original_rows: torch.Tensor | None = None) -> None:
        """Sum a batch of ``(n, G, C)`` input rows (and, for ``cross``, the original model's rows
        of the same samples)."""
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.square_total += (rows**2).sum(0)
        self.abs_total += rows.abs().sum(0)
        if self.gram is not None:
            self.gram += torch.einsum("ngc,ngd->gcd", rows, rows)
        if self.cross is not None and original_rows is not None:
            self.cross += torch.einsum("ngc,ngd->gcd", original_rows, rows)

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` per group."""
        return self.gram * (2.0 / max(1, self.count))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.count)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_total / max(1, self.count)


class LayerView:
    """How a Linear or convolution is read as ``(G, rows, columns)`` problems and written back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.groups = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1

    def matrix(self) -> torch.Tensor:
        """The effective weight (after the parametrizations so far), as float32 problems."""
        weight = self.module.weight.detach().to(torch.float32)
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    def to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """Problems back in the weight's own layout and dtype."""
        weight = self.module.weight
        return matrix.reshape(weight.shape).to(weight.dtype)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of layer inputs as ``(n, G, columns)`` float32 rows."""
        module = self.module
        x = x.detach().to(torch.float32)
        if isinstance(module, nn.Conv2d):
            x = padded(module, x if x.dim() == 4 else x[None])
            patches = F.unfold(x, module.kernel_size, module.dilation, 0, module.stride)
        elif isinstance(module, nn.Conv1d):
            x = padded(module, x if x.dim() == 3 else x[None])
            patches = F.unfold(
                x[:, :, None, :], (1, module.kernel_size[0]), (1, module.dilation[0]), 0, (1, module.stride[0])
            )
        else:
            return x.reshape(-1, 1, x.shape[-1])
        return patches.transpose(1, 2).reshape(-1, self.groups, patches.shape[1] // self.groups)

    def write(self, matrix: torch.Tensor) -> None:
        """Make ``matrix`` the layer's weight underneath its parametrizations (each a mask, which
        ``matrix`` already honours), so that the effective weight is ``matrix``."""
        value = self.to_weight(matrix)
        with torch.no_grad():
            if parametrize.is_parametrized(self.module, "weight"):
                self.module.parametrizations.weight.original.copy_(value)
            else:
                self.module.weight.copy_(value)


def padding_sides(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial dimension, as the convolution pads its input:
    ``"same"`` puts the odd element of an uneven total after, as PyTorch does."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the convolution pads it before its kernel slides (any ``padding`` and
    ``padding_mode``), so the patches unfold with no padding of their own."""
    sides = padding_sides(module)
    if not any(before or after for before, after in sides):
        return x
    flat = [v for before, after in reversed(sides) for v in (before, after)]  # F.pad: last dimension first
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def why_not_calibrated(module: nn.Module) -> str | None:
    """Why the calibrated methods cannot read ``module`` (it is then rounded / pruned by magnitude
    instead), or None when they can."""
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        return "an embedding has no input activations (it looks rows up), so it is rounded to nearest"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution's inputs are not unfolded here, so it is rounded to nearest"
    if isinstance(module, nn.modules.conv._ConvNd):
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return f"{kind}: only 1-D and 2-D convolutions are unfolded here, so it is rounded to nearest"
    elif not isinstance(module, nn.Linear):
        return f"{kind}: the calibrated methods read Linear and convolution layers"
    if parametrize.is_parametrized(module, "weight"):
        from .prune import WeightMask

        if not all(isinstance(step, WeightMask) for step in module.parametrizations.weight):
            return "it is already compressed by a step other than a mask before this one"
    if module.weight.dtype != torch.float32:
        return f"its weight is {module.weight.dtype}; the calibrated methods run on float32 layers (call model.float())"
    return None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else next(iter(kwargs.values()), None)
    return value if isinstance(value, torch.Tensor) else None


def padding_mask(batch: Any) -> torch.Tensor | None:
    """The ``(batch, tokens)`` attention mask of a batch given as keyword arguments (Hugging Face's
    ``attention_mask``: 1 for a real token, 0 for padding), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear's ``(batch, tokens, features)`` input without its padding tokens, as ``(n, features)``
    rows; ``x`` unchanged where the mask does not line up with it (no mask, another layout). GPTQ's
    Hessian, like every input statistic here, should describe the inputs the layer will really
    see; a padding token's hidden state is not one of them (its output is masked out downstream)."""
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(device=x.device) != 0]


def collect_stats(
    model: nn.Module,
    view: LayerView,
    batches: Sequence[Any],
    *,
    gram: bool,
    stop_early: bool,
    runner: Callable[[int], None] | None = None,
    reference: tuple[Callable[[int], None], nn.Module] | None = None,
) -> LayerStats:
    """Run ``batches`` through ``model`` (no gradient) and sum the inputs ``view``'s layer sees,
    a Linear's padding tokens left out where a batch carries an ``attention_mask``
    (:func:`real_tokens`). ``stop_early`` ends each pass at the layer (right when it runs once per
    forward). ``runner(i)``, where given, runs batch ``i`` instead (the block holding the layer on
    that batch's cached inputs, :mod:`tightfit.operators.blocks`). ``reference``: (what runs batch
    ``i`` through the original model, the original's module at this layer's place), run on each
    batch first, so that ``cross`` sums the original inputs against the compressed ones, call by call."""
    stats: LayerStats | None = None
    mask: torch.Tensor | None = None
    originals: list[torch.Tensor] = []

    def reference_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        originals.append(_input_rows(view, module, args, kwargs, mask))
        if stop_early:
            raise StopPass

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal stats
        rows = _input_rows(view, module, args, kwargs, mask)
        if stats is None:
            stats = LayerStats.empty(rows.shape[1], rows.shape[2], rows.device, gram, reference is not None)
        stats.add(rows, originals.pop(0) if stats.cross is not None else None)
        if stop_early:
            raise StopPass

    handles = [view.module.register_forward_pre_hook(hook, with_kwargs=True)]
    if reference is not None:
        handles.append(reference[1].register_forward_pre_hook(reference_hook, with_kwargs=True))
    try:
        for i, batch in enumerate(batches):
            mask = padding_mask(batch)
            if reference is not None:
                originals.clear()
                reference[0](i)
            if runner is None:
                run(model, [batch])
            else:
                runner(i)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _input_rows(
    view: LayerView, module: nn.Module, args: tuple, kwargs: dict, mask: torch.Tensor | None
) -> torch.Tensor:
    """The layer input a forward pre-hook sees, as ``(n, G, columns)`` rows (a Linear's padding
    tokens left out); no tensor input ends the pass."""
    x = _first_tensor(args, kwargs)
    if x is None:
        raise StopPass
    return view.rows(real_tokens(x, mask) if isinstance(module, nn.Linear) else x)


def run(model: nn.Module, batches: Iterable[Any]) -> None:
    """Every batch through ``model`` without gradients (a hook may end a pass early)."""
    with torch.no_grad():
        for batch in batches:
            with contextlib.suppress(StopPass):  # a hook ended the pass once its layer had run
                call_model(model, batch)
