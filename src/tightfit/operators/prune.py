"""Unstructured pruning: per layer, the smallest-magnitude weights are set to zero (or, with
calibration data, those of least |w| x input norm (Wanda), or those SparseGPT removes while
updating the rest); optionally in an N:M pattern (N of every M consecutive input weights kept)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import ELEMENTWISE_KINDS, LayerInfo, weight_names
from .base import Hyperparameter, Operator, Projection, check_target, parse_range
from .grid import as_rows
from .recurrent import parametrize_weights
from .solvers import nm_mask


class WeightMask(Projection, nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 mask, so pruned weights stay zero
    through fine-tuning (their gradient is zero too)."""

    def __init__(self, mask: torch.Tensor, pattern: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.pattern = tuple(pattern) if pattern else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    @property
    def sparsity(self) -> float:
        return float((self.mask == 0).sum()) / max(1, self.mask.numel())

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Keep the same number of weights, now the largest of ``weight`` (the mask is re-fitted)."""
        if self.pattern is not None:
            self.mask.copy_(pattern_mask(weight, *self.pattern))
            return weight.detach() * self.mask
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


def pattern_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A mask keeping the ``n`` largest magnitudes of every ``m`` consecutive weights of a row (the
    weight's first dimension are the rows, the others flattened its inputs)."""
    return nm_mask(as_rows(weight.detach().abs()), n, m).reshape(weight.shape)


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ConfigError(f'Prune: `pattern` must be "N:M" with 0 < N < M (e.g. "2:4", "4:8"), but got {pattern!r}.')
    return n, m


def _columns(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _check_fraction(name: str, value: float, upper_inclusive: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"Prune: `{name}` must lie in {bound}, but got {value!r}.")


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


class Prune(Operator):
    """Unstructured pruning with a per-layer sparsity (a recurrent layer's weight matrices each at
    that sparsity).

    ``sparsity`` is a fixed fraction of weights to remove, or a ``(low, high)`` range the search
    explores per layer (default ``(0.0, 0.99)``). ``pattern="2:4"`` (or "4:8", any "N:M") keeps N
    of every M consecutive input weights of a row instead, at sparsity 1 - N/M.

    ``method="magnitude"`` removes the smallest weights (of the whole layer; per M-group with a
    pattern). With calibration data (:func:`tightfit.compress_once`): ``"wanda"`` scores each weight
    by ``|w| * ||x_j||_2`` within its output row; ``"sparsegpt"`` removes weights by their
    Hessian-weighted saliency and updates the remaining ones to compensate (``percdamp`` as in
    :class:`Quantize`). Layers those cannot read (embeddings) are pruned by magnitude instead.
    ``target="original"`` first fits each such layer's weights to the original model's outputs
    (see :class:`Quantize`).
    """

    name = "prune"
    compresses_tied = True
    #: ``target="original"``'s ridge (a fraction of the mean diagonal of the inputs' Gram matrix;
    #: :func:`tightfit.operators.solvers.original_target`). On the validation splits
    #: (docs/calibration.md) 0.01 lost less than 0.1 in 10 of 16 pruning settings: all four on
    #: fmnist-mobilenet and tiny-lm, two of four on fmnist-resnet; minilm's four went the other way
    #: (SparseGPT 2:4: 0.117 against 0.101 in 1 - cosine). Pruning's own errors are large, so the
    #: fit may follow the calibration data closely.
    fit_damp = 0.01

    def __init__(
        self,
        sparsity: float | tuple[float, float] | None = None,
        *,
        method: str = "magnitude",
        pattern: str | None = None,
        percdamp: float = 0.01,
        target: str = "layer",
        layers: list[str] | None = None,
    ) -> None:
        super().__init__(layers=layers)
        if method not in PRUNE_METHODS:
            raise ConfigError(f"Prune: `method` must be one of {PRUNE_METHODS}, but got {method!r}.")
        if not isinstance(percdamp, (int, float)) or not 0 < percdamp <= 1:
            raise ConfigError(f"Prune: `percdamp` must lie in (0, 1], but got {percdamp!r}.")
        self.target = check_target("Prune", target, method != "magnitude", "method='wanda' or 'sparsegpt'")
        self.method, self.percdamp, self.pattern = method, float(percdamp), parse_pattern(pattern)
        if self.pattern is not None:
            fixed = 1.0 - self.pattern[0] / self.pattern[1]
            if sparsity is not None and parse_range(
                "Prune", "sparsity", sparsity, lambda v: 0.0 <= v < 1.0, "[0, 1)"
            ) != (fixed, fixed):
                raise ConfigError(
                    f"Prune: `pattern={pattern!r}` sets the sparsity to {fixed:g}; leave `sparsity` out, "
                    f"but got sparsity={sparsity!r}."
                )
            self.sparsity = (fixed, fixed)
        else:
            sparsity = (0.0, 0.99) if sparsity is None else sparsity
            self.sparsity = parse_range("Prune", "sparsity", sparsity, lambda v: 0.0 <= v < 1.0, "[0, 1)")

    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def supports(self, layer: LayerInfo) -> bool:
        return layer.kind in ELEMENTWISE_KINDS and (
            self.pattern is None or _columns(layer.weight_shape) % self.pattern[1] == 0
        )

    def why_not(self, layer: LayerInfo) -> str | None:
        if layer.kind in ELEMENTWISE_KINDS and self.pattern is not None:
            return (
                f"pattern {self.pattern[0]}:{self.pattern[1]} needs rows whose length ({_columns(layer.weight_shape)}) "
                f"is a multiple of {self.pattern[1]}"
            )
        return None

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        low, high = self.sparsity
        return [Hyperparameter("sparsity", low=low, high=high)]

    def identity(self) -> dict[str, Any]:
        return {"sparsity": 0.0}

    def needs_linear(self, settings: dict[str, Any]) -> bool:
        # the calibrated methods read a matrix layer as an nn.Linear (inputs along its rows)
        return self.needs_calibration() and float(settings["sparsity"]) > 0

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        if self.needs_calibration() and float(settings["sparsity"]) > 0:
            raise ConfigError(
                f"Prune(method={self.method!r}) needs calibration data: compress with "
                "tightfit.compress_once(model, strategy, calibration=batches), or use method='magnitude'."
            )
        self.apply_uncalibrated(module, settings)

    def apply_uncalibrated(self, module: nn.Module, settings: dict[str, Any]) -> None:
        """Magnitude pruning (a layer the calibrated methods cannot read)."""
        sparsity = float(settings["sparsity"])
        _check_fraction("sparsity", sparsity, upper_inclusive=True)
        if self.pattern is not None:
            if sparsity > 0:
                for name in weight_names(module):
                    if _columns(tuple(getattr(module, name).shape)) % self.pattern[1]:
                        raise ConfigError(
                            f"Prune: pattern {self.pattern} needs rows of {name!r} "
                            f"{tuple(getattr(module, name).shape)} whose length is a multiple of {self.pattern[1]}."
                        )
                parametrize_weights(
                    module, lambda weight: WeightMask(pattern_mask(weight, *self.pattern), self.pattern)
                )
            return
        # Magnitudes of each weight as it is now (after any earlier parametrization); a recurrent
        # layer's matrices each lose the same fraction (their scales differ: input vs hidden state).
        parametrize_weights(module, lambda weight: WeightMask(magnitude_mask(weight, sparsity)))

    def apply_calibrated(self, module: nn.Module, settings: dict[str, Any], view: Any, stats: Any) -> None:
        """Prune one layer from its input statistics (see :mod:`tightfit.operators.calibrated`)."""
        from .calibrated import prune_layer

        if float(settings["sparsity"]) > 0:
            prune_layer(self, module, settings, view, stats)

    def project(self, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        if self.pattern is not None:
            return weight.detach() * pattern_mask(weight, *self.pattern)
        return weight.detach() * magnitude_mask(weight, float(settings["sparsity"]))

    def config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.method != "magnitude":
            extra.update(method=self.method, percdamp=self.percdamp)
        if self.target != "layer":
            extra["target"] = self.target
        if self.pattern is not None:
            extra["pattern"] = f"{self.pattern[0]}:{self.pattern[1]}"
        return {"sparsity": list(self.sparsity), **extra, **super().config()}
