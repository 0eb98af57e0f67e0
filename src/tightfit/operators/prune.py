"""Unstructured magnitude pruning: per layer, the smallest-magnitude weights are set to zero."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import ELEMENTWISE_KINDS, LayerInfo
from .base import Hyperparameter, Operator, parse_range, Projection
from .recurrent import parametrize_weights


class WeightMask(Projection, nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 mask, so pruned weights stay zero
    through fine-tuning (their gradient is zero too)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    @property
    def sparsity(self) -> float:
        return float((self.mask == 0).sum()) / max(1, self.mask.numel())

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Keep the same number of weights, now the largest of ``weight`` (the mask is re-fitted)."""
        n_pruned = int((self.mask == 0).sum())
        self.mask.copy_(magnitude_mask(weight, n_pruned / max(1, weight.numel())))
        return weight.detach() * self.mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A mask keeping the ``1 - sparsity`` fraction of entries with the largest magnitude."""
    n = weight.numel()
    n_pruned = int(round(sparsity * n))
    mask = torch.ones_like(weight)
    if n_pruned <= 0:
        return mask
    flat = mask.view(-1)
    if n_pruned >= n:
        flat.zero_()
        return mask
    # topk on the negated magnitudes: indices of the n_pruned smallest, deterministic on ties.
    _, idx = torch.topk(weight.detach().abs().view(-1), n_pruned, largest=False, sorted=False)
    flat[idx] = 0.0
    return mask


def _check_fraction(name: str, value: float, upper_inclusive: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"Prune: `{name}` must lie in {bound}, but got {value!r}.")


class Prune(Operator):
    """Unstructured magnitude pruning with a per-layer sparsity (a recurrent layer's weight
    matrices each at that sparsity).

    ``sparsity`` is a fixed fraction of weights to remove, or a ``(low, high)`` range the search
    explores per layer (default ``(0.0, 0.99)``).
    """

    name = "prune"
    compresses_tied = True

    def __init__(self, sparsity: float | tuple[float, float] = (0.0, 0.99), *, layers: list[str] | None = None) -> None:
        super().__init__(layers=layers)
        low, high = parse_range("Prune", "sparsity", sparsity, lambda v: 0.0 <= v < 1.0, "[0, 1)")
        self.sparsity = (low, high)

    def supports(self, layer: LayerInfo) -> bool:
        return layer.kind in ELEMENTWISE_KINDS

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        low, high = self.sparsity
        return [Hyperparameter("sparsity", low=low, high=high)]

    def identity(self) -> dict[str, Any]:
        return {"sparsity": 0.0}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        sparsity = float(settings["sparsity"])
        _check_fraction("sparsity", sparsity, upper_inclusive=True)
        # Magnitudes of each weight as it is now (after any earlier parametrization); a recurrent
        # layer's matrices each lose the same fraction (their scales differ: input vs hidden state).
        parametrize_weights(module, lambda weight: WeightMask(magnitude_mask(weight, sparsity)))

    def project(self, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return weight.detach() * magnitude_mask(weight, float(settings["sparsity"]))

    def config(self) -> dict[str, Any]:
        return {"sparsity": list(self.sparsity), **super().config()}
