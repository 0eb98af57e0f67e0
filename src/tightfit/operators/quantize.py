"""Weight quantization to k bits: symmetric, one scale per output channel; 16 means float16."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import ELEMENTWISE_KINDS, LayerInfo
from .base import Hyperparameter, Operator, Projection
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
    """Parametrization that rounds a weight onto its k-bit grid (per output channel).

    Zeros stay zeros (the grid is symmetric with no offset), so pruning and quantization compose.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (as floats, in [-qmax, qmax]) and the per-channel scale, shaped to broadcast."""
        reduce_dims = tuple(range(1, weight.dim()))
        amax = weight.detach().abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.detach().abs()
        scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
        codes = torch.clamp(_RoundSTE.apply(weight / scale), -self.qmax, self.qmax)
        return codes, scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits >= 32:
            return weight
        if self.bits == 16:
            return _CastSTE.apply(weight)
        codes, scale = self.quantize(weight)
        return codes * scale

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Rounding onto the grid (the grid is derived from the weight, so nothing to re-fit)."""
        return self.forward(weight.detach())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class Quantize(Operator):
    """Quantize weights to ``bits`` (one value, or a tuple the search chooses from per layer).

    2-8 bits: symmetric per-channel integer grid; 16: float16; 32: unchanged.
    """

    name = "quantize"
    compresses_tied = True

    def __init__(self, bits: int | tuple[int, ...] = (4, 8), *, layers: list[str] | None = None) -> None:
        super().__init__(layers=layers)
        choices = (bits,) if isinstance(bits, int) else tuple(bits)
        bad = [b for b in choices if b not in SUPPORTED_BITS]
        if not choices or bad:
            raise ConfigError(f"Quantize: `bits` must be drawn from {SUPPORTED_BITS}, but got {bits!r}.")
        self.bits = tuple(sorted(set(int(b) for b in choices)))

    def supports(self, layer: LayerInfo) -> bool:
        return layer.kind in ELEMENTWISE_KINDS

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        return [Hyperparameter("bits", choices=self.bits)]

    def identity(self) -> dict[str, Any]:
        return {"bits": 32}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        bits = int(settings["bits"])
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"Quantize: `bits` must be one of {SUPPORTED_BITS}, but got {bits!r}.")
        if bits >= 32:
            return
        parametrize_weights(module, lambda weight: FakeQuantize(bits))

    def project(self, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return FakeQuantize(int(settings["bits"])).project(weight)

    def config(self) -> dict[str, Any]:
        return {"bits": list(self.bits), **super().config()}
