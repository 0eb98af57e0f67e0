"""ProxConnect (Dockhorn et al. 2021, "Demystifying and Generalizing BinaryConnect").

The forward pass uses the proximal map of the float weights ``w`` toward the quantization grid,

    P_rho(w) = (w + rho * Pi(w)) / (1 + rho)        (prox of rho/2 * dist(., grid)^2)

with a sharpness ``rho`` that grows during training (geometrically from ``sharpness[0]`` to
``sharpness[1]``), and the gradient taken at ``P_rho(w)`` updates ``w`` itself:
``w <- w - lr * grad f(P_rho(w))``. With ``rho = inf`` throughout this is BinaryConnect's
straight-through estimator (``sharpness=(inf, inf)``). At the end the model holds the hard
projection ``Pi(w)``, stored by the plan's own :class:`~tightfit.operators.quantize.FakeQuantize`.

Grids (per output channel): ``binary`` {-a, a} with ``a = mean|w|``; ``ternary`` {-a, 0, a} with
threshold ``0.7 mean|w|`` and ``a`` the mean magnitude above it (ternary weight networks);
``kbit``: FakeQuantize's symmetric k-bit grid. Binary and ternary need ``bits=2`` in the plan (the
file stores them as 2-bit codes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..operators.base import Hyperparameter
from ..operators.quantize import FakeQuantize
from ._base import LossFn, Recovery, Site, check_optimizer, make_optimizer, sites, swapped_steps

GRIDS = ("auto", "binary", "ternary", "kbit")


def _channel_reduce(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


@torch.no_grad()
def grid_project(w: torch.Tensor, grid: str, bits: int) -> torch.Tensor:
    """``Pi(w)``: nearest point of the grid (per output channel)."""
    dims = _channel_reduce(w)
    mag = w.abs()
    if grid == "binary":
        a = mag.mean(dim=dims, keepdim=True) if dims else mag.mean()
        return torch.where(w >= 0, a, -a)
    if grid == "ternary":
        delta = 0.7 * (mag.mean(dim=dims, keepdim=True) if dims else mag.mean())
        big = mag > delta
        count = big.sum(dim=dims, keepdim=True) if dims else big.sum()
        a = (
            (mag * big).sum(dim=dims, keepdim=True) / torch.clamp(count, min=1)
            if dims
            else (mag * big).sum() / max(1, int(count))
        )
        return torch.sign(w) * a * big
    return FakeQuantize(bits)(w)


class _ProxStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, target):  # noqa: D102
        return target

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class ProxQuantStep(nn.Module):
    """Training-time stand-in for a FakeQuantize step: forward ``P_rho(w)``, gradient passed to ``w``."""

    def __init__(self, grid: str, bits: int) -> None:
        super().__init__()
        self.grid = grid
        self.bits = bits
        self.rho = 0.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = grid_project(w, self.grid, self.bits)
            target = q if math.isinf(self.rho) else (w + self.rho * q) / (1.0 + self.rho)
        return _ProxStraightThrough.apply(w, target)


def sharpness_at(progress: float, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (progress 0) to ``end`` (progress 1)."""
    if math.isinf(start) or math.isinf(end) and progress >= 1:
        return math.inf
    if math.isinf(end):
        end = 1e6
    if start <= 0:
        start = 1e-6
    return start * (end / start) ** min(1.0, max(0.0, progress))


class ProxConnect(Recovery):
    """Quantization-aware recovery for the plan's :class:`~tightfit.operators.Quantize` layers.

    ``grid="auto"``: ternary for 2-bit layers, the k-bit grid otherwise. ``sharpness=(start, end)``;
    ``(inf, inf)`` is the straight-through estimator (BinaryConnect) on the same grid. The default
    10 -> 1e4 is the schedule that matched or beat straight-through on the digits MLP in
    benchmarks/recovery.py (1 -> 1e3 stayed 0.46 points below it; docs/benchmarks.md).
    """

    name = "proxconnect"

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int = 6,
        lr: float = 1e-3,
        optimizer: str = "adam",
        grid: str = "auto",
        sharpness: tuple[float, float] = (10.0, 1e4),
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        if grid not in GRIDS:
            raise ConfigError(f"ProxConnect: `grid` must be one of {GRIDS}, but got {grid!r}.")
        start, end = (float(v) for v in sharpness)
        if not 0 <= start <= end:
            raise ConfigError(
                f"ProxConnect: `sharpness` must be (start, end) with 0 <= start <= end, but got {sharpness!r}."
            )
        self.optimizer = check_optimizer(optimizer, "ProxConnect")
        self.grid = grid
        self.sharpness = (start, end)

    def tunable(self) -> dict[str, Hyperparameter]:
        return {**super().tunable(), "grid": Hyperparameter("grid", choices=("ternary", "kbit"))}

    def _grid_for(self, bits: int) -> str:
        grid = self.grid if self.grid != "auto" else ("ternary" if bits == 2 else "kbit")
        if grid in ("binary", "ternary") and bits != 2:
            raise ConfigError(
                f"ProxConnect: grid {grid!r} is stored as 2-bit codes; quantize those layers with bits=2, not {bits}."
            )
        return grid

    def __call__(self, model: nn.Module) -> None:
        swaps: list[tuple[nn.ModuleList, int, nn.Module]] = []
        targets: list[tuple[Site, int, ProxQuantStep]] = []
        for site in sites(model):
            for i, step in enumerate(site.chain):
                if isinstance(step, FakeQuantize) and step.bits < 16:
                    new = ProxQuantStep(self._grid_for(step.bits), step.bits)
                    swaps += site.swap(i, new)
                    targets.append((site, i, new))
        if not targets:
            raise ConfigError(
                "ProxConnect: the model has no quantized layer below 16 bits; apply a plan with Quantize first."
            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(self.optimizer, params, self.lr)
        total = max(1, self.total_steps())

        def sharpen(step: int) -> None:
            rho = sharpness_at(step / max(1, total - 1), *self.sharpness)
            for _, _, prox in targets:
                prox.rho = rho

        with swapped_steps(swaps):
            self.fit(model, opt, before=sharpen)
        self._harden(targets)

    @staticmethod
    @torch.no_grad()
    def _harden(targets: list[tuple[Site, int, ProxQuantStep]]) -> None:
        """Store ``Pi(w)`` in the originals, so the plan's FakeQuantize reproduces it exactly."""
        for site, index, step in targets:
            if step.grid == "kbit":
                continue  # FakeQuantize is this grid's projection already
            x = site.original
            for prior in list(site.chain)[:index]:
                x = prior(x)  # masks before the quantizer: Pi keeps their zeros
            site.original.copy_(grid_project(x, step.grid, step.bits))

    def _repr_args(self) -> dict[str, Any]:
        return {**super()._repr_args(), "grid": self.grid, "sharpness": self.sharpness}
