"""The certificate of the final answer: an upper confidence bound on each metric constraint's value
and the probability that the constraints are met, from validation samples the search never saw.

Two different statements, computed differently:

- **Bounds** (frequentist): "the constraint's value on new data is <= bound" holds with probability
  >= ``confidence`` over the draw of the held-out samples, whatever the true value. How depends on
  what the per-sample statistic can be (``StatisticForm.kind``):

  - ``"paired01"``: a 0/1 metric (Accuracy, Agreement) compared with the original sample by sample,
    so each difference is -1, 0 or +1. Exact: the three outcome counts are trinomial; a value is
    rejected when the probability of a studentized mean at most the observed one, maximized over
    the nuisance (the share of discordant samples), is <= alpha. No normal approximation, so it
    holds with few discordant pairs too (with 400 held-out samples or fewer; above that the normal
    bound with a variance floor, where the normal approximation is good).
  - ``"single01"``: a 0/1 metric against a fixed threshold (``MinMetric``): Clopper-Pearson.
  - ``"bounded"``: any statistic with a known range (``Fidelity(kind="cosine")``, a ``PerSample``
    metric given ``value_range``): a betting confidence bound (Waudby-Smith & Ramdas, JRSS-B 2024),
    valid for every distribution on that range (conservative: ~1.5x the normal width).
  - ``"unbounded"``: no range known (``Fidelity(kind="kl")``, a user metric without
    ``value_range``): a Student-t bound with the variance floor of ``mean_estimate``. Approximate;
    the method text says so.

  Bonferroni over constraints: each bound is at level ``1 - (1 - confidence) / k``.

- **Probability** (Bayesian): P(all constraints met) from a normal posterior of each constraint's
  value given the held-out estimate, with an *edge prior*: the search chose the answer because it
  met the constraints on the search samples and pushes compression until it barely does, so before
  the held-out samples are read its value is taken to be centred on the constraint's edge (0, or the
  search estimate if that is above the edge), with a spread of the larger of the search estimate's
  standard error and its distance from the edge. A flat prior (the first version: ``Phi(-mean /
  se)``) was overconfident for answers at the edge: in 99 coverage runs, stated 0.80-0.95 were met
  8 times in 16 (docs/benchmarks.md, "Certificate coverage"). Union bound over constraints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .constraints import Constraint
from .statistics import mean_estimate, normal_cdf

#: pseudo-samples of maximal variance mixed into each variance estimate (see ``mean_estimate``)
PRIOR_WEIGHT = 2.0
#: the exact trinomial bound enumerates (n + 1)(n + 2) / 2 outcomes; above this many held-out
#: samples the normal bound with a variance floor is used instead
EXACT_MAX_SAMPLES = 400
#: values of the nuisance (share of discordant samples) the exact bound maximizes over
NUISANCE_GRID = 100

KINDS = ("paired01", "single01", "bounded", "unbounded")


@dataclass(frozen=True)
class StatisticForm:
    """What a constraint's per-sample statistic can be: ``kind`` (see the module doc), its range
    ``(low, high)`` when known, the constant ``offset`` that is part of it (``-max_drop`` for
    ``MaxDrop``: the statistic is ``difference + offset``; for ``MinMetric`` on a 0/1 metric the
    statistic is ``offset - value`` with ``offset`` the threshold), and ``prior_variance``, the
    variance floor of its standard errors."""

    kind: str = "unbounded"
    low: float | None = None
    high: float | None = None
    offset: float = 0.0
    prior_variance: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"StatisticForm: `kind` must be one of {KINDS}, but got {self.kind!r}.")
        if self.kind == "bounded" and (self.low is None or self.high is None or not self.low < self.high):
            raise ValueError(f"StatisticForm: a bounded statistic needs low < high, but got ({self.low}, {self.high}).")


@dataclass(frozen=True)
class Certificate:
    """How sure we are that the chosen model meets the constraints on new data from the same source.

    ``bounds``: one-sided upper confidence bounds at ``confidence`` (Bonferroni over constraints) on
    each metric constraint's value, computed as ``bound_methods`` says; ``certified`` when all are
    <= 0. ``probability``: P(all metric constraints met) from the edge-prior posterior (see the
    module doc; ``priors``: centre and spread of each prior, None for a flat prior). ``estimates``
    and ``standard_errors``: each value's held-out mean and its standard error. ``method`` says all
    this in words.
    """

    probability: float
    confidence: float
    certified: bool
    bounds: tuple[float, ...]
    estimates: tuple[float, ...]
    standard_errors: tuple[float, ...]
    constraints: tuple[str, ...]
    samples: int
    method: str
    bound_methods: tuple[str, ...] = ()
    priors: tuple[tuple[float, float] | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "confidence": self.confidence,
            "certified": self.certified,
            "bounds": list(self.bounds),
            "estimates": list(self.estimates),
            "standard_errors": list(self.standard_errors),
            "constraints": list(self.constraints),
            "samples": self.samples,
            "method": self.method,
            "bound_methods": list(self.bound_methods),
            "priors": [list(p) if p is not None else None for p in self.priors],
        }


# --- upper confidence bounds on a mean ------------------------------------------------------------


def paired01_upper(n_plus: int, n_minus: int, n: int, alpha: float, prior_variance: float = 1.0) -> float:
    """Exact one-sided ``1 - alpha`` upper bound on ``p_plus - p_minus`` from ``n`` samples of a
    -1/0/+1 variable with ``n_plus`` ones and ``n_minus`` minus ones.

    The test of "mean = delta" orders outcomes by the studentized mean (variance floored as in
    ``mean_estimate``) and takes the largest probability of an outcome at most as large as the
    observed one over the nuisance ``d = p_plus + p_minus`` (a grid of ``NUISANCE_GRID`` values);
    the bound is the largest delta that test does not reject (bisection).
    """
    from scipy.special import gammaln

    if not (n_plus >= 0 and n_minus >= 0 and n_plus + n_minus <= n and n >= 1):
        raise ValueError(f"counts ({n_plus}, {n_minus}) do not fit {n} samples.")
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = a + b <= n
    a, b = a[keep].astype(np.float64), b[keep].astype(np.float64)
    log_coef = gammaln(n + 1) - gammaln(a + 1) - gammaln(b + 1) - gammaln(n - a - b + 1)

    def studentized_parts(
        a_: np.ndarray | np.float64, b_: np.ndarray | np.float64
    ) -> tuple[np.ndarray | np.float64, np.ndarray | np.float64]:
        mean = (a_ - b_) / n
        s2 = np.maximum((a_ + b_) / n - mean**2, 0.0) * (n / max(1, n - 1))
        s2 = (n * s2 + PRIOR_WEIGHT * prior_variance) / (n + PRIOR_WEIGHT)
        return mean, np.sqrt(s2 / n)

    means, ses = studentized_parts(a, b)
    obs_mean, obs_se = studentized_parts(np.float64(n_plus), np.float64(n_minus))
    u = np.linspace(0.0, 1.0, NUISANCE_GRID) ** 2

    def p_value(delta: float) -> float:
        at_most = (means - delta) / ses <= (obs_mean - delta) / obs_se + 1e-12
        aa, bb, cc = a[at_most], b[at_most], log_coef[at_most]
        d = abs(delta) + (1 - abs(delta)) * u  # share of discordant samples, >= |delta|
        p_plus = np.clip((d + delta) / 2, 0.0, 1.0)[:, None]
        p_minus = np.clip((d - delta) / 2, 0.0, 1.0)[:, None]
        p_zero = np.clip(1.0 - d, 0.0, 1.0)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_p = (
                cc
                + np.where(aa > 0, aa * np.log(p_plus), 0.0)
                + np.where(bb > 0, bb * np.log(p_minus), 0.0)
                + np.where(n - aa - bb > 0, (n - aa - bb) * np.log(p_zero), 0.0)
            )
        return float(np.nan_to_num(np.exp(log_p), nan=0.0).sum(axis=1).max())

    low, high = float(obs_mean), 1.0
    if p_value(high) > alpha:
        return 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if p_value(mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def clopper_pearson_lower(successes: int, n: int, alpha: float) -> float:
    """Exact one-sided ``1 - alpha`` lower bound on a success probability."""
    from scipy.stats import beta

    return 0.0 if successes <= 0 else float(beta.ppf(alpha, successes, n - successes + 1))


def betting_upper(values: torch.Tensor, low: float, high: float, alpha: float) -> float:
    """One-sided ``1 - alpha`` upper bound on the mean of i.i.d. values in ``[low, high]``, valid
    for any distribution on that range: the smallest ``m`` at which betting against "mean >= m"
    (wealth ``prod(1 + lambda_i (m - x_i))``, bets ``lambda_i`` from the values before ``i``) has
    multiplied its stake by ``1 / alpha`` (Ville's inequality)."""
    x = ((values.detach().to(torch.float64).flatten().numpy()) - low) / (high - low)
    n = len(x)
    if n == 0:
        return high
    x = np.clip(x, 0.0, 1.0)
    # predictable plug-in bets: running mean and variance of the values seen so far (with a prior
    # of one pseudo-sample at mean 1/2, variance 1/4)
    mu = np.empty(n)
    var = np.empty(n)
    total, squares = 0.5, 0.25
    for i in range(n):
        mu[i] = total / (i + 1)
        var[i] = squares / (i + 1)
        total += x[i]
        squares += (x[i] - mu[i]) ** 2
    lam = np.sqrt(2 * math.log(1 / alpha) / (n * var))
    target = math.log(1 / alpha)

    def log_wealth(m: float) -> float:
        bets = np.minimum(lam, 0.75 / max(1.0 - m, 1e-12))  # keeps 1 + lambda (m - x) > 0 for x <= 1
        return float(np.log1p(bets * (m - x)).sum())

    lo, hi = float(x.mean()), 1.0
    if log_wealth(hi - 1e-12) < target:
        return high
    for _ in range(50):
        mid = (lo + hi) / 2
        if log_wealth(mid) >= target:
            hi = mid
        else:
            lo = mid
    return low + (high - low) * hi


def t_upper(values: torch.Tensor, alpha: float, prior_variance: float = 0.0) -> float:
    """One-sided ``1 - alpha`` Student-t upper bound on a mean, the variance floored by
    ``PRIOR_WEIGHT`` pseudo-samples of ``prior_variance`` (approximate: assumes near-normality)."""
    from scipy.stats import t

    e = mean_estimate(values, prior_variance=prior_variance, prior_weight=PRIOR_WEIGHT if prior_variance > 0 else 0.0)
    return e.mean + float(t.ppf(1 - alpha, max(1, e.n - 1))) * e.se


def upper_bound(values: torch.Tensor, form: StatisticForm, alpha: float) -> tuple[float, str]:
    """The ``1 - alpha`` upper bound on the mean of a constraint's per-sample statistic, and how it
    was computed (a short name)."""
    x = values.detach().to(torch.float64).flatten()
    n = int(x.numel())
    if form.kind == "paired01":
        diff = _whole(x - form.offset)  # back to -1/0/+1
        if diff is not None and torch.all(diff.abs() <= 1):
            if n <= EXACT_MAX_SAMPLES:
                bound = paired01_upper(
                    int((diff > 0).sum()), int((diff < 0).sum()), n, alpha, form.prior_variance or 1.0
                )
                return bound + form.offset, "exact trinomial"
            return _normal_upper(x, alpha, form.prior_variance or 1.0), "normal, variance floor (n > 400)"
    if form.kind == "single01":
        value = _whole(form.offset - x)  # back to 0/1
        if value is not None and torch.all((value == 0) | (value == 1)):
            return form.offset - clopper_pearson_lower(int(value.sum()), n, alpha), "Clopper-Pearson"
    if form.low is not None and form.high is not None and form.low < form.high:
        return betting_upper(x, form.low, form.high, alpha), "betting (bounded)"
    return t_upper(x, alpha, form.prior_variance), "Student t, variance floor (approximate: no range known)"


def _whole(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` rounded to whole numbers if it is whole up to float error (the offset was added in
    floating point), else None."""
    r = torch.round(x)
    return r if torch.allclose(x, r, rtol=0.0, atol=1e-9) else None


def _normal_upper(x: torch.Tensor, alpha: float, prior_variance: float) -> float:
    from .statistics import z_value

    e = mean_estimate(x, prior_variance=prior_variance, prior_weight=PRIOR_WEIGHT)
    return e.mean + z_value(2 * alpha) * e.se


# --- the probability ------------------------------------------------------------------------------


def edge_prior(search_mean: float, search_se: float) -> tuple[float, float]:
    """Centre and spread of the edge prior from the answer's value on the search samples."""
    centre = max(search_mean, 0.0)
    return centre, max(search_se, abs(search_mean), 1e-12)


def posterior_met(mean: float, se: float, prior: tuple[float, float] | None) -> float:
    """P(value <= 0) under the normal posterior from an estimate ``mean`` with standard error ``se``
    and a normal prior ``(centre, spread)`` (None: flat prior)."""
    if se <= 0:
        return float(mean <= 0)
    if prior is None:
        return normal_cdf(-mean / se)
    centre, spread = prior
    precision = 1 / spread**2 + 1 / se**2
    post_mean = (centre / spread**2 + mean / se**2) / precision
    return normal_cdf(-post_mean * math.sqrt(precision))


# --- the certificate ------------------------------------------------------------------------------


def certify(
    statistics: torch.Tensor,
    constraints: Sequence[Constraint],
    confidence: float,
    prior_variances: Sequence[float],
    *,
    forms: Sequence[StatisticForm] | None = None,
    search_statistics: torch.Tensor | None = None,
) -> Certificate:
    """The certificate from the per-sample statistics (``n x k``) of held-out samples.

    ``forms``: what each statistic can be (default: unbounded, floored by ``prior_variances``).
    ``search_statistics``: the answer's statistics on the search samples (``m x k``), for the edge
    prior; without them the probability uses a flat prior (and says so).
    """
    n, k = int(statistics.shape[0]), int(statistics.shape[1])
    forms = (
        list(forms) if forms is not None else [StatisticForm("unbounded", prior_variance=v) for v in prior_variances]
    )
    alpha = (1 - confidence) / max(1, k)
    estimates = [
        mean_estimate(statistics[:, j], prior_variance=prior_variances[j], prior_weight=PRIOR_WEIGHT) for j in range(k)
    ]
    bounds, how = [], []
    for j in range(k):
        bound, name = upper_bound(statistics[:, j], forms[j], alpha)
        bounds.append(bound)
        how.append(name)
    priors: list[tuple[float, float] | None] = []
    for j in range(k):
        if search_statistics is not None and search_statistics.shape[0] >= 2:
            s = mean_estimate(search_statistics[:, j], prior_variance=prior_variances[j], prior_weight=PRIOR_WEIGHT)
            priors.append(edge_prior(s.mean, s.se))
        else:
            priors.append(None)
    probs = [posterior_met(e.mean, e.se, p) for e, p in zip(estimates, priors)]
    probability = max(0.0, 1.0 - sum(1 - p for p in probs))
    if search_statistics is not None and all(p is not None for p in priors):
        prior_text = (
            f"an edge prior from the answer's value on the {int(search_statistics.shape[0])} search samples (centred on the "
            "constraint's edge, or on the search estimate if above it; spread = the larger of that estimate's standard error "
            "and its distance from the edge)"
        )
    else:
        prior_text = "a flat prior (no search-sample values given)"
    method = (
        f"{n} validation samples held out of the search (never used to choose the model). Bounds: one-sided "
        f"{confidence:.0%} upper confidence bounds on each constraint's value (Bonferroni over {k} constraint(s)), "
        f"by {', '.join(sorted(set(how)))}. Probability: P(met) from the normal posterior of each constraint's value given "
        f"its held-out mean and standard error (variance floored by {PRIOR_WEIGHT:g} pseudo-samples of maximal variance) "
        f"and {prior_text}; union bound over constraints."
    )
    return Certificate(
        probability=probability,
        confidence=confidence,
        certified=all(b <= 0 for b in bounds),
        bounds=tuple(bounds),
        estimates=tuple(e.mean for e in estimates),
        standard_errors=tuple(e.se for e in estimates),
        constraints=tuple(c.describe() for c in constraints),
        samples=n,
        method=method,
        bound_methods=tuple(how),
        priors=tuple(priors),
    )


def holds(certificate: Certificate, truths: Sequence[float]) -> bool:
    """Whether the certificate's bounds held for the true constraint values (for coverage checks)."""
    return all(t <= b for t, b in zip(truths, certificate.bounds))


__all__ = [
    "Certificate",
    "StatisticForm",
    "betting_upper",
    "certify",
    "clopper_pearson_lower",
    "edge_prior",
    "holds",
    "paired01_upper",
    "posterior_met",
    "t_upper",
    "upper_bound",
]
