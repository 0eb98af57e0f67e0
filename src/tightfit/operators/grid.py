"""Integer grids for weights: per output channel or per group of input weights, symmetric or with
a zero point, and an optional per-input-column scale (activation-aware scaling).

A weight is read as a matrix ``(rows, columns)``: its first dimension are the rows (output
channels; an embedding's entries), the others flattened are the columns (inputs). A group is
``group_size`` consecutive columns of one row; group size 0 means one group per row. The weight a
grid stands for is ``((codes - zero) * scale_per_column) * column_inverse`` (the zero and the
column factor only when present), in exactly that order of float32 operations: the ``.tfz``
codec decodes with the same sequence, so the saved codes reproduce the evaluated weight bit for
bit (:func:`tightfit.export.codec.encode_quantized` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Grid:
    """Integer codes of a weight and the scales that turn them back into it.

    ``codes`` has the weight's shape (signed integers held as floats); ``scale`` and ``zero`` are
    ``(rows, groups)``; ``column_inverse`` is ``(columns,)`` or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    bits: int
    column_inverse: torch.Tensor | None = None


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code: symmetric grids are [-(2^(b-1)-1), 2^(b-1)-1] (zero stays zero
    without a zero point); asymmetric ones use all 2^b codes, [-2^(b-1), 2^(b-1)-1]."""
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def per_column(values: torch.Tensor, group_size: int, columns: int) -> torch.Tensor:
    """A ``(rows, groups)`` array spread over the ``columns`` it covers."""
    if group_size <= 0:
        return values.expand(values.shape[0], columns) if values.shape[1] == 1 else values
    return values.repeat_interleave(group_size, dim=1)[:, :columns]


def fit_scales(matrix: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``matrix`` ``(rows, n)``: the grid spans the row's
    range (symmetric: its largest magnitude; asymmetric: [min(w, 0), max(w, 0)], so that 0 is a
    code and pruned weights stay exactly zero)."""
    low, high = code_range(bits, symmetric)
    matrix = matrix.detach()
    if symmetric:
        amax = matrix.abs().amax(dim=1, keepdim=True)
        return torch.where(amax > 0, amax / high, torch.ones_like(amax)), None
    wmin = matrix.amin(dim=1, keepdim=True).clamp(max=0)
    wmax = matrix.amax(dim=1, keepdim=True).clamp(min=0)
    span = wmax - wmin
    scale = torch.where(span > 0, span / (high - low), torch.ones_like(span))
    zero = low - torch.round(wmin / scale)
    return scale, zero.clamp(low, high)


def half_exact(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest float16 value where it lies in float16's normal range (the
    file then stores the scales in 2 bytes, :func:`tightfit.export.codec.encode_grid`); a relative
    change of at most 2^-11, far below a 2-8 bit grid's step. Values outside the range stay."""
    normal = (scale >= 2.0**-14) & (scale <= 65504.0)
    return torch.where(normal, scale.to(torch.float16).to(scale.dtype), scale)


def group_scales(
    matrix: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, groups)`` scales (and zero points) of a ``(rows, columns)`` matrix, the scales
    float16-exact where they can be (:func:`half_exact`)."""
    rows, columns = matrix.shape
    if group_size <= 0 or group_size >= columns:
        scale, zero = fit_scales(matrix, bits, symmetric)
        if zero is not None:  # the zero point that goes with the rounded scale
            low, high = code_range(bits, symmetric)
            scale = half_exact(scale)
            return scale, (low - torch.round(matrix.detach().amin(dim=1, keepdim=True).clamp(max=0) / scale)).clamp(
                low, high
            )
        return half_exact(scale), None
    groups = -(-columns // group_size)
    padded = torch.nn.functional.pad(matrix.detach(), (0, groups * group_size - columns))
    # padding with zeros changes nothing: the range of a group always includes 0 here (symmetric
    # uses |w|; asymmetric clamps min <= 0 <= max)
    scale, zero = group_scales(padded.reshape(rows * groups, group_size), bits, 0, symmetric)
    return scale.reshape(rows, groups), None if zero is None else zero.reshape(rows, groups)


def round_codes(
    matrix: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, rounder=torch.round
) -> torch.Tensor:
    """Codes of ``matrix`` on the grid (``scale``/``zero`` already spread per column)."""
    low, high = code_range(bits, zero is None)
    scaled = rounder(matrix / scale)
    if zero is not None:
        scaled = scaled + zero
    return torch.clamp(scaled, low, high)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The weight the codes stand for (``scale``/``zero`` spread per column)."""
    return (codes - zero) * scale if zero is not None else codes * scale


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a ``(rows, columns)`` matrix (a view)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(-1, 1)
