"""Estimates from per-sample values: means with standard errors (U-statistics of order one), the
order-two U-statistic for metrics defined on pairs of samples, and normal quantiles.

A metric that returns one value per validation sample is a mean, so any subsample of the samples
gives an unbiased estimate of it with a standard error. Sampling is *without* replacement from a
finite set, so the standard error carries the finite-population correction: it is zero once every
sample has been seen, where the estimate is the exact full-set value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` of ``population`` samples and its standard error (finite-population
    corrected when ``population`` is given; ``se == 0`` when the whole population was seen)."""

    mean: float
    se: float
    n: int
    population: int | None = None

    def interval(self, z: float) -> tuple[float, float]:
        return self.mean - z * self.se, self.mean + z * self.se


def z_value(two_sided_alpha: float) -> float:
    """The normal quantile ``z`` with ``P(|Z| > z) = two_sided_alpha``."""
    if not 0 < two_sided_alpha < 1:
        raise ValueError(f"`two_sided_alpha` must be in (0, 1), but got {two_sided_alpha!r}.")
    return _NORMAL.inv_cdf(1 - two_sided_alpha / 2)


def normal_cdf(x: float) -> float:
    return _NORMAL.cdf(x)


def mean_estimate(
    values: torch.Tensor,
    *,
    population: int | None = None,
    prior_variance: float = 0.0,
    prior_weight: float = 0.0,
) -> Estimate:
    """Mean of ``values`` (a U-statistic of order one) with its standard error.

    ``prior_variance``/``prior_weight`` shrink the sample variance towards a conservative value:
    ``(n * s^2 + w * v0) / (n + w)``. Without it, a small subsample in which every value happens to
    be equal (all 30 samples classified alike by both models) would claim a standard error of zero.
    """
    x = values.detach().to(torch.float64).flatten()
    n = int(x.numel())
    if n == 0:
        raise ValueError("mean_estimate needs at least one value.")
    mean = float(x.mean())
    s2 = float(x.var(unbiased=True)) if n > 1 else 0.0
    if prior_weight > 0:
        s2 = (n * s2 + prior_weight * prior_variance) / (n + prior_weight)
    fpc = 1.0
    if population is not None:
        if n > population:
            raise ValueError(f"{n} values cannot come from a population of {population}.")
        fpc = (population - n) / (population - 1) if population > 1 else 0.0
    return Estimate(mean, math.sqrt(max(0.0, s2 * fpc / n)), n, population)


def u_statistic2(values: torch.Tensor, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Estimate:
    """The U-statistic of order two, ``mean over pairs i<j of kernel(x_i, x_j)``, with the standard
    error of its first-order Hoeffding projection: ``se^2 ~= 4 var(h1) / n`` where
    ``h1(x_i) = mean over j != i of kernel(x_i, x_j)``.

    ``kernel`` is symmetric and vectorised: called with two broadcastable tensors (shapes
    ``n x 1 x ...`` and ``1 x n x ...``) it returns the ``n x n`` matrix of kernel values. Metrics
    defined on pairs of samples (ranking metrics such as AUC, pairwise agreement) are of this form.
    """
    x = values.detach()
    n = int(x.shape[0])
    if n < 2:
        raise ValueError("an order-two U-statistic needs at least two values.")
    h = kernel(x.unsqueeze(1), x.unsqueeze(0)).to(torch.float64)
    if h.shape != (n, n):
        raise ValueError(f"kernel must return an n x n matrix of pair values, but got shape {tuple(h.shape)}.")
    off = ~torch.eye(n, dtype=torch.bool)
    mean = float(h[off].mean())
    h1 = (h * off).sum(dim=1) / (n - 1)
    var_h1 = float(h1.var(unbiased=True)) if n > 2 else 0.0
    return Estimate(mean, math.sqrt(max(0.0, 4.0 * var_h1 / n)), n)


__all__ = ["Estimate", "mean_estimate", "normal_cdf", "u_statistic2", "z_value"]
