"""Prune-and-splice: dynamic network surgery (Guo et al. 2016), the inner loop of OLMP.

Masks are recomputed while training. Each pruned layer gets a threshold ``t = mean|w| + c*std|w|``
(statistics of its uncompressed weights when recovery starts); a weight is pruned when ``|w|``
falls below ``0.9 t``, spliced back when it rises above ``1.1 t``, and keeps its state in between
(hysteresis, so masks do not flicker). The masked forward pass sends the *full* gradient to every
weight, pruned ones included (straight-through), so a wrongly pruned weight can grow back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..operators.base import Hyperparameter
from ..operators.prune import WeightMask
from ._base import LossFn, Recovery, Site, check_optimizer, make_optimizer, sites, swapped_steps


def layer_threshold(weight: torch.Tensor, c: float) -> float:
    """``t = mean|w| + c * std|w|`` (never below 0)."""
    mag = weight.detach().abs().flatten()
    std = float(mag.std()) if mag.numel() > 1 else 0.0
    return max(0.0, float(mag.mean()) + c * std)


def c_for_sparsity(weight: torch.Tensor, sparsity: float) -> float:
    """The ``c`` whose threshold ``mean + c*std`` prunes ``sparsity`` of ``weight`` by magnitude:
    how a plan's sparsity becomes a starting threshold for the surgery."""
    mag = weight.detach().abs().flatten()
    if mag.numel() < 2 or sparsity <= 0:
        return -float("inf") if sparsity <= 0 else 0.0
    t = float(torch.quantile(mag, min(1.0, sparsity)))
    std = float(mag.std())
    return (t - float(mag.mean())) / std if std > 0 else 0.0


@torch.no_grad()
def update_mask(
    mask: torch.Tensor, weight: torch.Tensor, threshold: float, low: float = 0.9, high: float = 1.1
) -> torch.Tensor:
    """Hysteresis: 0 where ``|w| < low*t``, 1 where ``|w| > high*t``, unchanged in between (in place)."""
    mag = weight.detach().abs()
    mask[mag < low * threshold] = 0.0
    mask[mag > high * threshold] = 1.0
    return mask


class _MaskStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask):  # noqa: D102
        return weight * mask

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None  # the full gradient reaches pruned weights too


class SpliceMask(nn.Module):
    """Training-time stand-in for a :class:`WeightMask`: same mask buffer, full gradients."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask  # shared with the WeightMask it stands in for (not a copy)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskStraightThrough.apply(weight, self.mask)


class PruneSplice(Recovery):
    """Dynamic network surgery on the masks a plan's :class:`~tightfit.operators.Prune` made.

    ``c``: per-layer threshold factor, one number for all layers, a dict ``{layer: c}``, or None to
    derive each layer's ``c`` from the sparsity the plan gave it (so the search's sparsities become
    the starting thresholds). ``hysteresis = (0.9, 1.1)`` are the prune / splice factors of ``t``.
    Masks are updated every ``update_every`` steps. The final model keeps ordinary WeightMasks; the
    sparsity it ends with is whatever the surgery settled on (the search measures it).
    """

    name = "splice"

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int = 6,
        lr: float = 1e-3,
        optimizer: str = "adam",
        c: float | dict[str, float] | None = None,
        hysteresis: tuple[float, float] = (0.9, 1.1),
        update_every: int = 1,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        low, high = (float(v) for v in hysteresis)
        if not 0 < low <= 1 <= high:
            raise ConfigError(
                f"PruneSplice: `hysteresis` must be (low <= 1 <= high) with low > 0, but got {hysteresis!r}."
            )
        if not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"PruneSplice: `update_every` must be a whole number >= 1, but got {update_every!r}.")
        self.optimizer = check_optimizer(optimizer, "PruneSplice")
        self.c = c
        self.hysteresis = (low, high)
        self.update_every = update_every
        #: layer -> threshold used in the last call.
        self.thresholds: dict[str, float] = {}

    def tunable(self) -> dict[str, Hyperparameter]:
        return {**super().tunable(), "update_every": Hyperparameter("update_every", low=1, high=16, integer=True)}

    def _c_for(self, site: Site, mask_step: WeightMask) -> float:
        layer = site.name.rsplit(".", 1)[0]
        if self.c is None:
            return c_for_sparsity(site.original, mask_step.sparsity)
        if isinstance(self.c, dict):
            if layer not in self.c:
                raise ConfigError(
                    f"PruneSplice: `c` has no entry for layer {layer!r}; give every pruned layer a value."
                )
            return float(self.c[layer])
        return float(self.c)

    def __call__(self, model: nn.Module) -> None:
        swaps, watched = [], []
        self.thresholds = {}
        for site in sites(model):
            for i, step in enumerate(site.chain):
                if isinstance(step, WeightMask):
                    c = self._c_for(site, step)
                    t = layer_threshold(site.original, c) if c != -float("inf") else 0.0
                    self.thresholds[site.name.rsplit(".", 1)[0]] = t
                    mask = cast(torch.Tensor, step.mask)  # a buffer: Module.__getattr__ says Tensor | Module
                    swaps += site.swap(i, SpliceMask(mask))
                    watched.append((site, mask, t))
                    break  # one mask per tensor
        if not watched:
            raise ConfigError(
                "PruneSplice: the model has no pruning masks; apply a plan with Prune first (compress() does this)."
            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(self.optimizer, params, self.lr)
        low, high = self.hysteresis

        def update_masks(step: int) -> None:
            if (step + 1) % self.update_every == 0:
                for site, mask, t in watched:
                    update_mask(mask, site.original, t, low, high)

        with swapped_steps(swaps):
            self.fit(model, opt, after=update_masks)

    def _repr_args(self) -> dict[str, Any]:
        return {**super()._repr_args(), "c": self.c, "hysteresis": self.hysteresis}
