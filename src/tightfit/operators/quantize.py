"""Weight quantization to k bits: symmetric, one scale per output channel; 16 means float16."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import ELEMENTWISE_KINDS, LayerInfo
from .base import Hyperparameter, Operator, Projection, check_target
from .grid import Grid, as_rows, dequantize, group_scales, per_column, round_codes
from .recurrent import parametrize_weights

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)


class _RoundSTE(torch.autograd.Function):
    """Rounding whose gradient is the identity (straight-through estimator).

    A custom function, rather than ``w + (round(w) - w).detach()``, so that the forward value is
    exactly ``round(w)``: the saved integer codes must reproduce the evaluated weights bit for bit.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


class _CastSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


class FakeQuantize(Projection, nn.Module):
    """Parametrization that rounds a weight onto its k-bit grid.

    By default one symmetric scale per output channel, derived from the weight at each call, so
    zeros stay zeros and pruning and quantization compose. ``group_size`` gives one scale per group
    of that many consecutive input weights of a row; ``symmetric=False`` adds a zero point per group
    (0 stays a code, so pruned weights stay zero). A grid found on calibration data (GPTQ) is held
    fixed: ``scale``/``zero`` given as ``(rows, groups)`` tensors. ``column_scale`` (activation-aware
    scaling) rounds ``W * s`` and returns it divided by ``s`` per input column. See
    :mod:`tightfit.operators.grid` for the layout the ``.tfz`` stores.
    """

    def __init__(
        self,
        bits: int,
        group_size: int = 0,
        symmetric: bool = True,
        *,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        column_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.bits = int(bits)
        self.group_size = int(group_size or 0)
        self.symmetric = bool(symmetric)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("column_scale", column_scale)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        """The original layout: a symmetric scale per output channel derived from the weight."""
        return self.group_size == 0 and self.symmetric and self.scale is None and self.column_scale is None

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (as floats, in [-qmax, qmax]) and the per-channel scale, shaped to broadcast
        (the per-channel layout; :meth:`grid` covers every layout)."""
        reduce_dims = tuple(range(1, weight.dim()))
        amax = weight.detach().abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.detach().abs()
        scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
        codes = torch.clamp(_RoundSTE.apply(weight / scale), -self.qmax, self.qmax)
        return codes, scale

    def grid(self, weight: torch.Tensor) -> Grid:
        """Codes of ``weight`` and the grid they are on, in any layout."""
        matrix = as_rows(weight)
        inverse = None
        if self.column_scale is not None:
            inverse = 1.0 / self.column_scale
            matrix = matrix * self.column_scale
        if self.scale is not None:
            scale, zero = self.scale, self.zero
        else:
            scale, zero = group_scales(matrix, self.bits, self.group_size, self.symmetric)
        columns = matrix.shape[1]
        codes = round_codes(
            matrix,
            per_column(scale, self.group_size, columns),
            None if zero is None else per_column(zero, self.group_size, columns),
            self.bits,
            _RoundSTE.apply,
        )
        return Grid(codes.reshape(weight.shape), scale, zero, self.group_size, self.bits, inverse)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits >= 32:
            return weight
        if self.bits == 16:
            return _CastSTE.apply(weight)
        if self.per_channel:
            codes, scale = self.quantize(weight)
            return codes * scale
        return dequantize_grid(self.grid(weight)).reshape(weight.shape)

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Rounding onto the grid (derived from the weight, or fixed: nothing to re-fit)."""
        return self.forward(weight.detach())

    def extra_repr(self) -> str:
        parts = [f"bits={self.bits}"]
        if self.group_size:
            parts.append(f"group_size={self.group_size}")
        if not self.symmetric:
            parts.append("symmetric=False")
        if self.scale is not None:
            parts.append("fixed grid")
        if self.column_scale is not None:
            parts.append("column scale")
        return ", ".join(parts)


def dequantize_grid(grid: Grid) -> torch.Tensor:
    """The ``(rows, columns)`` weight a grid stands for (the order of operations the codec decodes with)."""
    codes = as_rows(grid.codes)
    columns = codes.shape[1]
    zero = None if grid.zero is None else per_column(grid.zero, grid.group_size, columns)
    matrix = dequantize(codes, per_column(grid.scale, grid.group_size, columns), zero)
    return matrix * grid.column_inverse if grid.column_inverse is not None else matrix


QUANTIZE_METHODS = ("rtn", "gptq")
#: GPTQ's column orders (`Quantize(act_order=...)`; :func:`tightfit.operators.solvers.column_order`).
ACT_ORDERS = (False, True, "groups")


def _group_sizes(value: Any) -> tuple[int, ...]:
    """``group_size`` as a tuple of choices; None or 0 stands for one scale per output channel."""
    choices = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for choice in choices:
        if choice is None or choice == 0:
            out.append(0)
        elif isinstance(choice, int) and not isinstance(choice, bool) and choice >= 2:
            out.append(int(choice))
        else:
            raise ConfigError(
                f"Quantize: `group_size` must be None (per channel), a whole number >= 2 (e.g. 32, 64, "
                f"128), or a tuple of those the search chooses from, but got {value!r}."
            )
    if not out:
        raise ConfigError("Quantize: `group_size` must not be an empty tuple.")
    return tuple(dict.fromkeys(out))


class Quantize(Operator):
    """Quantize weights to ``bits`` (one value, or a tuple the search chooses from per layer).

    2-8 bits: an integer grid, one scale per output channel, or per ``group_size`` consecutive input
    weights of a row (one value, or a tuple searched per layer); ``symmetric=False`` adds a zero
    point per group. 16: float16; 32: unchanged.

    ``method="gptq"`` rounds column by column and compensates each rounding error on the columns
    still to come, with the layer's input Hessian from calibration data (``percdamp``: damping, as
    a fraction of the Hessian's mean diagonal; ``act_order``: largest inputs first, ``True`` with
    the group scales fixed before the pass from the original weights, ``"groups"`` taking whole
    groups (the one with the largest input first) so each scale is set as its group starts, from
    the weights updated so far; see :func:`tightfit.operators.solvers.column_order`). ``awq=True``
    scales each input column by ``mean|x|^alpha`` (alpha searched per layer) before rounding and
    back after. Both need calibration data (:func:`tightfit.compress_once`); layers they cannot
    read (embeddings, transposed convolutions) are rounded to nearest instead, with the reason.
    ``target="original"`` first fits each such layer's weights (least squares, damped towards the
    weights themselves) to the original model's outputs at that layer on the original model's
    inputs, so that the errors of the layers compressed before it are compensated as well as its
    own (GPTAQ's "asymmetric calibration"); ``"layer"`` (GPTQ's) keeps the layer's own outputs on
    the inputs it now sees. It costs a pass of the original model (the caller's, not a copy) per layer.

    A matrix layer stored input-major (GPT-2's ``Conv1D``, weight ``in x out``) runs as its
    ``nn.Linear`` equivalent below 16 bits, so that it too gets one scale per output channel and
    its groups run along its inputs (``matrix_as_linear``). Plans recorded without that argument
    replay the layout they were made with: the stored rows, i.e. one scale per input (per channel)
    and groups along outputs, so files saved before load as they were.
    """

    name = "quantize"
    compresses_tied = True
    #: ``target="original"``'s ridge (see :attr:`Prune.fit_damp`). Chosen on the validation splits
    #: (docs/calibration.md): GPTQ 4-bit g128 on fmnist-mobilenet lost 0.52 / 0.18 / 0.34 points at
    #: 0.01 / 0.1 / 1.0; minilm 0.0200 / 0.0169 in 1 - cosine at 0.01 / 0.1; tiny-lm 0.0004 / 0.0005
    #: nats (3 bits: 0.0042 / 0.0033). Quantization's errors are small, so with a weak ridge a late
    #: layer with about as many inputs as calibration rows fits the calibration set's noise instead.
    fit_damp = 0.1

    def __init__(
        self,
        bits: int | tuple[int, ...] = (4, 8),
        *,
        method: str = "rtn",
        group_size: Any = None,
        symmetric: bool = True,
        act_order: bool | str = False,
        percdamp: float = 0.01,
        awq: bool = False,
        target: str = "layer",
        matrix_as_linear: bool = True,
        layers: list[str] | None = None,
    ) -> None:
        super().__init__(layers=layers)
        choices = (bits,) if isinstance(bits, int) else tuple(bits)
        bad = [b for b in choices if b not in SUPPORTED_BITS]
        if not choices or bad:
            raise ConfigError(f"Quantize: `bits` must be drawn from {SUPPORTED_BITS}, but got {bits!r}.")
        self.bits = tuple(sorted(set(int(b) for b in choices)))
        if method not in QUANTIZE_METHODS:
            raise ConfigError(f"Quantize: `method` must be one of {QUANTIZE_METHODS}, but got {method!r}.")
        if not isinstance(percdamp, (int, float)) or not 0 < percdamp <= 1:
            raise ConfigError(
                f"Quantize: `percdamp` must lie in (0, 1] (0.01 is GPTQ's default), but got {percdamp!r}."
            )
        if act_order not in ACT_ORDERS or not isinstance(act_order, (bool, str)):
            raise ConfigError(
                f"Quantize: `act_order` must be True, False or 'groups' (GPTQ's column order), but got {act_order!r}."
            )
        flags = (
            ("symmetric", symmetric),
            ("awq", awq),
            ("matrix_as_linear", matrix_as_linear),
        )
        for flag, value in flags:
            if not isinstance(value, bool):
                raise ConfigError(f"Quantize: `{flag}` must be True or False, but got {value!r}.")
        self.method, self.group_sizes, self.symmetric = method, _group_sizes(group_size), symmetric
        self.act_order, self.percdamp, self.awq = act_order, float(percdamp), awq
        self.target = check_target("Quantize", target, self.needs_calibration(), "method='gptq' or awq=True")
        self.matrix_as_linear = matrix_as_linear

    @property
    def grouped(self) -> bool:
        """Whether the layout goes beyond the original per-channel symmetric one (settings then
        carry ``group_size``; plans made before group-wise scales stay as they were)."""
        return self.group_sizes != (0,)

    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.awq

    def supports(self, layer: LayerInfo) -> bool:
        return layer.kind in ELEMENTWISE_KINDS

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        found = [Hyperparameter("bits", choices=self.bits)]
        return found + ([Hyperparameter("group_size", choices=self.group_sizes)] if self.grouped else [])

    def identity(self) -> dict[str, Any]:
        return {"bits": 32, **({"group_size": self.group_sizes[0]} if self.grouped else {})}

    def needs_linear(self, settings: dict[str, Any]) -> bool:
        # a matrix layer stored input-major (GPT-2's Conv1D) runs as a Linear, so that its grid's
        # rows are output channels and its groups run along inputs, as the Hessian's columns do.
        # Group-wise round-to-nearest too: on the stored (in, out) weight its groups ran along
        # outputs (tiny-lm 4-bit g128: +0.0054 nats as Conv1D vs +0.0063 as Linear, benchmarks/peers.py);
        # per channel, its scales were one per input row instead of one per output channel
        return (self.needs_calibration() or self.matrix_as_linear) and int(settings["bits"]) < 16

    def _step(self, settings: dict[str, Any], **grid: Any) -> FakeQuantize:
        return FakeQuantize(int(settings["bits"]), int(settings.get("group_size", 0) or 0), self.symmetric, **grid)

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        if self.needs_calibration() and int(settings["bits"]) < 16:
            raise ConfigError(
                f"Quantize(method={self.method!r}{', awq=True' if self.awq else ''}) needs calibration data: compress with "
                "tightfit.compress_once(model, strategy, calibration=batches), or use method='rtn'."
            )
        self.apply_uncalibrated(module, settings)

    def apply_uncalibrated(self, module: nn.Module, settings: dict[str, Any]) -> None:
        """Round to nearest (a layer the calibrated methods cannot read)."""
        bits = int(settings["bits"])
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"Quantize: `bits` must be one of {SUPPORTED_BITS}, but got {bits!r}.")
        if bits >= 32:
            return
        parametrize_weights(module, lambda weight: self._step(settings))

    def apply_calibrated(self, module: nn.Module, settings: dict[str, Any], view: Any, stats: Any) -> None:
        """Quantize one layer from its input statistics (see :mod:`tightfit.operators.calibrated`)."""
        from .calibrated import quantize_layer

        if int(settings["bits"]) >= 16:
            return self.apply_uncalibrated(module, settings)
        quantize_layer(self, module, settings, view, stats)

    def project(self, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return self._step(settings).project(weight)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Operator:
        # a plan recorded before `matrix_as_linear` rounded an input-major layer's stored rows (inputs);
        # replaying it that way keeps the files saved with it loading as they were
        return cls(**config, **({} if "matrix_as_linear" in config else {"matrix_as_linear": False}))

    def config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.method != "rtn":
            extra.update(method=self.method, act_order=self.act_order, percdamp=self.percdamp)
        if self.grouped:
            extra["group_size"] = [g or None for g in self.group_sizes]
        if not self.symmetric:
            extra["symmetric"] = False
        if self.awq:
            extra["awq"] = True
        if self.target != "layer":
            extra["target"] = self.target
        return {"bits": list(self.bits), **extra, "matrix_as_linear": self.matrix_as_linear, **super().config()}
