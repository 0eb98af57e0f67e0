"""Sequential evaluation: decide a candidate's constraint on a growing subsample, and certify the
final answer on validation samples the search never saw.

The validation samples are put in one seeded random order, the same for every candidate. A
``certify_fraction`` of them (the tail of that order) is held out of the search; the rest, the
*search set*, is read in looks of growing size (``first_look``, x``growth``, ..., all of it). The
original model's per-sample values are computed once, so each look compares candidate and original
on the same samples (paired differences, much less noisy than two separate means).

At each interim look, every metric constraint gets a normal confidence interval for its value on
the whole search set (finite-population corrected). The search stops as soon as an interval lies
entirely on one side of zero: infeasible if any constraint is surely violated, feasible if all are
surely met. The error budget ``1 - confidence`` is split evenly over the interim looks and
constraints (Bonferroni), so the chance of *any* wrong early decision stays below it however many
looks are taken. The last look uses the whole search set, where the value is exact and the decision
is the one full evaluation would make on those samples.

A second, looser boundary only rejects (futility, as group-sequential trials stop for it): from
``futility_samples`` on, a candidate whose chance of meeting a constraint at that look is below
``futility`` is rejected. It never accepts, so a plan the search takes as feasible is held to the
test above; its errors (a feasible plan rejected) cost the search compression, never the answer's
guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .certificate import PRIOR_WEIGHT, Certificate, StatisticForm, certify, holds
from .constraints import Constraint, MaxDrop, MaxSize, MinMetric
from .metrics import SampleMetric
from .statistics import Estimate, mean_estimate, z_value

FEASIBLE, INFEASIBLE, UNDECIDED = "feasible", "infeasible", "undecided"


@dataclass(frozen=True)
class Sequential:
    """Cheap, certified evaluation for ``tightfit.compress(..., evaluation=Sequential())``.

    - ``confidence``: the probability that every early decision of the sequential test is right,
      and the level of the final certificate's bound.
    - ``first_look``: samples at the first look; each later look has ``growth`` times more, the last
      one the whole search set.
    - ``certify_fraction``: share of the validation samples held out of the search, used only to
      certify the final answer (0 disables the certificate).
    - ``screen``: multi-fidelity. A candidate that cannot improve the answer found so far (its
      objective is no smaller than the best feasible one's, or a size constraint already fails) is
      only screened: no fine-tuning, first look only. Others are promoted to the full fine-tune.
    - ``min_improvement``: a candidate is promoted only when its objective is at least this
      fraction below the best feasible one's. A search that has found its region proposes many
      plans a fraction of a percent smaller than its answer (measured on mnist1d: 7 of 30 trials
      after the answer, 0.7% smaller together); each would cost a whole fine-tune for a change
      nobody ships. 0 promotes every improvement.
    - ``seed``: the order of the samples; ``None`` uses the seed given to ``compress``.
    - ``stages``: fidelity levels inside the fine-tune. A promoted candidate is checked after these
      fractions of its fine-tuning steps, on the first ``stage_samples`` samples of the search set,
      and stopped when it surely cannot meet a constraint even after the remaining steps, judged
      by what the remaining steps gave candidates fine-tuned in full (at least ``min_curves`` of
      them, gains inflated by ``stop_slack``; see ``tightfit.evaluation.stages``). ``()`` disables.
      Curves (untuned, each stage and final values on the stage samples) are recorded for the
      first ``max_curves`` candidates fine-tuned in full; later ones only pay the stage looks.
      One stage by default, at 1/6: with successive promotion, a second look costs
      ``stage_samples`` passes on every candidate that passed the first. At 1/6 rather than 1/3
      a stopped candidate costs half as much, and the stop decisions were no worse (digits, 10
      seeds: fine-tune steps 0.46 of full evaluation's instead of 0.64, same compression; at 1/10
      the stage predicted too little and more candidates went on; docs/benchmarks.md).
    - ``promote_probability``: successive promotion inside the fine-tune. Once the stages are
      calibrated, a candidate is fine-tuned past a stage only while the probability that it meets
      every constraint at the end (its stage estimate minus the curves' mean gain, with the
      estimate's and the gains' spread; ``stages.feasible_probability``) is at least this; below
      it, it is stopped like a hopeless one and told to the search with its central prediction.
      0 keeps only the ``hopeless`` rule (stop when surely infeasible).
    - ``probe_samples``: the search method's probes (plans measured without fine-tuning, e.g. the
      sensitivity scan of ``search="bo"``) read the search set sequentially too, up to this many
      samples (None: up to all of it). They rank layers and place the warm start, which the
      fine-tuned trials then correct; 64 halves their passes against 128 (docs/benchmarks.md).
    - ``futility``: a candidate is rejected at an interim look of at least ``futility_samples``
      samples once the probability that it meets some metric constraint (normal, at that look's
      estimate and standard error) is below this. A search that has found its region proposes
      plans at the constraint's edge, which the test above must read almost whole to reject
      (fmnist-resnet: 14-16 of the 17 model-driven trials infeasible, most read whole;
      docs/evidence.md). It only rejects: what it gets wrong is a feasible plan the search does not
      see, never an infeasible one taken. 0 disables it. 0.1 read 10% fewer validation images on
      fmnist-resnet and 21% fewer on fmnist-mobilenet (budget 30, 5 seeds), with median answers no
      smaller than full evaluation's; 0.25 read 37% fewer on fmnist-mobilenet but wrongly rejects
      three times as many feasible plans at the edge (20% against 6.3% for a plan 0.005 under the
      limit; docs/evidence.md, "Futility stops"). ``futility_samples``: the
      smallest look it applies at (below a few hundred samples the normal approximation of a 0/1
      difference is poor).
    - ``trial_samples``: a full evaluation reads at most this many samples of the search set (Ma et
      al.'s noisy estimates on a subsample). A candidate still undecided there is *capped*: the
      search is told its estimates, with their standard error, as a noisy observation, and it is
      never the answer as it stands. After the search, at most ``verify_top`` capped candidates
      smaller than the best decided one, that the constraint model of all trials expects to be
      feasible, are read on the rest of the search set with the same test, smallest first; the
      first one accepted is the answer, so an answer is decided as a full read would decide it.
      Without a cap a search that has found its region reads its candidates at the constraint's
      edge almost whole (fmnist-resnet: 14-16 of 17 model-driven trials; 51% of full evaluation's
      validation images with the futility stops). At 2048, on fmnist-resnet and fmnist-mobilenet
      (budget 30, 5 seeds, docs/evidence.md, "Capped trials"): 38% and 32% of full evaluation's
      images, median answers 6% larger and 3% smaller than full evaluation's, mean test drops
      within 0.1 points of its; at 1024, 25-26% of the images, but median answers 8% and 4%
      smaller. None reads every candidate to a decision; a search set of at most
      ``trial_samples`` samples is never capped.
    """

    confidence: float = 0.95
    first_look: int = 32
    growth: float = 2.0
    certify_fraction: float = 0.25
    screen: bool = True
    min_improvement: float = 0.01
    seed: int | None = None
    stages: tuple[float, ...] = (1 / 6,)
    stage_samples: int = 64
    min_curves: int = 3
    max_curves: int = 5
    stop_slack: float = 0.5
    promote_probability: float = 0.5
    probe_samples: int | None = 64
    futility: float = 0.1
    futility_samples: int = 512
    trial_samples: int | None = 2048
    verify_top: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.confidence, (int, float)) and 0.5 <= self.confidence < 1):
            raise ConfigError(f"Sequential: `confidence` must be in [0.5, 1), but got {self.confidence!r}.")
        if not (isinstance(self.first_look, int) and self.first_look >= 2):
            raise ConfigError(
                f"Sequential: `first_look` must be a whole number of samples >= 2, but got {self.first_look!r}."
            )
        if not (isinstance(self.growth, (int, float)) and self.growth > 1):
            raise ConfigError(f"Sequential: `growth` must be a number > 1, but got {self.growth!r}.")
        if not (isinstance(self.certify_fraction, (int, float)) and 0 <= self.certify_fraction < 0.9):
            raise ConfigError(f"Sequential: `certify_fraction` must be in [0, 0.9), but got {self.certify_fraction!r}.")
        if not (isinstance(self.min_improvement, (int, float)) and 0 <= self.min_improvement < 1):
            raise ConfigError(
                f"Sequential: `min_improvement` must be a fraction in [0, 1), but got {self.min_improvement!r}."
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"Sequential: `seed` must be an int or None, but got {self.seed!r}.")
        if not (
            isinstance(self.stages, (tuple, list))
            and all(isinstance(f, (int, float)) and 0 < f < 1 for f in self.stages)
        ):
            raise ConfigError(
                f"Sequential: `stages` must be a tuple of fractions in (0, 1) (or () for none), but got {self.stages!r}."
            )
        object.__setattr__(self, "stages", tuple(sorted(float(f) for f in self.stages)))
        if not (isinstance(self.stage_samples, int) and self.stage_samples >= 2):
            raise ConfigError(
                f"Sequential: `stage_samples` must be a whole number of samples >= 2, but got {self.stage_samples!r}."
            )
        if not (isinstance(self.futility, (int, float)) and 0 <= self.futility < 0.5):
            raise ConfigError(
                f"Sequential: `futility` must be a probability in [0, 0.5) (0: no futility stops), but got {self.futility!r}."
            )
        if not (isinstance(self.futility_samples, int) and self.futility_samples >= 2):
            raise ConfigError(
                f"Sequential: `futility_samples` must be a whole number of samples >= 2, but got {self.futility_samples!r}."
            )
        if self.trial_samples is not None and not (isinstance(self.trial_samples, int) and self.trial_samples >= 2):
            raise ConfigError(
                f"Sequential: `trial_samples` must be a whole number of samples >= 2 or None, but got {self.trial_samples!r}."
            )
        if not (isinstance(self.verify_top, int) and not isinstance(self.verify_top, bool) and self.verify_top >= 1):
            raise ConfigError(f"Sequential: `verify_top` must be a whole number >= 1, but got {self.verify_top!r}.")
        if self.probe_samples is not None and not (isinstance(self.probe_samples, int) and self.probe_samples >= 2):
            raise ConfigError(
                f"Sequential: `probe_samples` must be a whole number of samples >= 2 or None, but got {self.probe_samples!r}."
            )
        if not (isinstance(self.min_curves, int) and self.min_curves >= 1):
            raise ConfigError(f"Sequential: `min_curves` must be a whole number >= 1, but got {self.min_curves!r}.")
        if not (isinstance(self.max_curves, int) and self.max_curves >= self.min_curves):
            raise ConfigError(
                f"Sequential: `max_curves` must be a whole number >= min_curves ({self.min_curves}), but got {self.max_curves!r}."
            )
        if not (isinstance(self.promote_probability, (int, float)) and 0 <= self.promote_probability < 1):
            raise ConfigError(
                f"Sequential: `promote_probability` must be in [0, 1) (0: stop only hopeless candidates), but got {self.promote_probability!r}."
            )
        if not (isinstance(self.stop_slack, (int, float)) and self.stop_slack >= 0):
            raise ConfigError(f"Sequential: `stop_slack` must be a number >= 0, but got {self.stop_slack!r}.")

    def describe(self) -> dict[str, Any]:
        return {
            "method": "sequential",
            "confidence": self.confidence,
            "first_look": self.first_look,
            "growth": self.growth,
            "certify_fraction": self.certify_fraction,
            "screen": self.screen,
            "min_improvement": self.min_improvement,
            "seed": self.seed,
            "stages": list(self.stages),
            "stage_samples": self.stage_samples,
            "min_curves": self.min_curves,
            "max_curves": self.max_curves,
            "stop_slack": self.stop_slack,
            "promote_probability": self.promote_probability,
            "probe_samples": self.probe_samples,
            "futility": self.futility,
            "futility_samples": self.futility_samples,
            "trial_samples": self.trial_samples,
            "verify_top": self.verify_top,
        }


def look_schedule(population: int, first_look: int, growth: float) -> list[int]:
    """Subsample sizes of the looks: ``first_look``, times ``growth``, ..., ending at ``population``."""
    if population < 1:
        raise ValueError("the search set is empty")
    looks: list[int] = []
    n = float(min(first_look, population))
    while int(n) < population:
        if not looks or int(n) > looks[-1]:
            looks.append(int(n))
        n *= growth
    looks.append(population)
    return looks


# --- the statistic each constraint is a mean of ------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    """Constraint value as the mean of a per-sample statistic ``z_i`` (<= 0 on average = met)."""

    constraint: Constraint

    def values(self, candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        c = self.constraint
        if isinstance(c, MaxDrop):
            return (baseline - candidate) - c.max_drop
        if isinstance(c, MinMetric):
            return c.threshold - candidate
        raise TypeError(c)

    def form(self, value_range: tuple[float, float] | None, binary: bool, prior_variance: float) -> StatisticForm:
        """What the statistic can be, for the certificate's bound (see ``tightfit.evaluation.certificate``)."""
        c = self.constraint
        if isinstance(c, MaxDrop):
            if binary:
                return StatisticForm("paired01", offset=-c.max_drop, prior_variance=prior_variance)
            if value_range:
                span = value_range[1] - value_range[0]
                return StatisticForm("bounded", -span - c.max_drop, span - c.max_drop, prior_variance=prior_variance)
        elif isinstance(c, MinMetric):
            if binary:
                return StatisticForm("single01", offset=c.threshold, prior_variance=prior_variance)
            if value_range:
                return StatisticForm(
                    "bounded", c.threshold - value_range[1], c.threshold - value_range[0], prior_variance=prior_variance
                )
        return StatisticForm("unbounded", prior_variance=prior_variance)

    def prior_variance(self, width: float) -> float:
        # z ranges over at most 2*width for a paired difference, width for a single model's value
        span = 2 * width if isinstance(self.constraint, MaxDrop) else width
        return span * span / 4


def per_sample_constraints(constraints: Sequence[Constraint]) -> tuple[list[int], list[int], list[int]]:
    """Split constraint positions into (metric constraints that are means of a per-sample statistic,
    constraints that do not depend on the metric, metric constraints of another form)."""
    linear, fixed, other = [], [], []
    for i, c in enumerate(constraints):
        if isinstance(c, (MaxDrop, MinMetric)):
            linear.append(i)
        elif isinstance(c, MaxSize):
            fixed.append(i)
        else:
            other.append(i)
    return linear, fixed, other


# --- the test itself: pure, on per-sample statistics --------------------------------------------


@dataclass(frozen=True)
class Look:
    samples: int
    estimates: tuple[Estimate, ...]
    verdict: str


@dataclass(frozen=True)
class Decision:
    """Outcome of the sequential test: the verdict, the estimates of each constraint's value at the
    last look (finite-population corrected standard errors), and every look taken."""

    verdict: str
    estimates: tuple[Estimate, ...]
    samples: int
    looks: tuple[Look, ...]
    futile: bool = False  # rejected by the futility boundary, not by the test's own


def sequential_test(
    statistic: Callable[[int, int], torch.Tensor],
    looks: Sequence[int],
    *,
    confidence: float,
    prior_variances: Sequence[float],
    stop_after: int | None = None,
    futility: float = 0.0,
    futility_samples: int = 0,
) -> Decision:
    """Run the test on ``statistic(start, stop) -> Tensor[stop - start, k]``, the per-sample values
    of ``k`` constraint statistics for samples ``start..stop`` of the fixed order (each constraint is
    met when its statistic's mean over all ``looks[-1]`` samples is <= 0).

    ``stop_after`` caps the number of looks (a screen takes one). Returns at the first look where
    every interval is decided, or after the last look (exact: standard error zero). ``futility``
    (> 0): from ``futility_samples`` on, an interim look also rejects when some constraint is met
    with probability below it (one-sided, not split over the looks: a futility stop is never an
    acceptance, see the module's docstring).
    """
    population = looks[-1]
    k = len(prior_variances)
    interim = max(1, len(looks) - 1)
    # One-sided bounds: a look errs only on the side the truth is not on (a met constraint surely
    # violated, or a violated one surely met), so each look and constraint may spend
    # (1 - confidence) / (interim * k) on one tail. Two-sided quantiles spent half of the budget
    # (z 2.69 instead of 2.45 with 7 interim looks at 0.95) and read more samples for nothing.
    z = z_value(2 * (1 - confidence) / (interim * max(1, k)))
    z_futile = z_value(2 * futility) if futility > 0 else None
    seen: list[torch.Tensor] = []
    taken: list[Look] = []
    start = 0
    for number, n in enumerate(looks, 1):
        chunk = statistic(start, n)
        if chunk.dim() == 1:
            chunk = chunk.unsqueeze(1)
        seen.append(chunk.to(torch.float64))
        start = n
        values = torch.cat(seen)
        estimates = (
            tuple(
                mean_estimate(
                    values[:, j], population=population, prior_variance=prior_variances[j], prior_weight=PRIOR_WEIGHT
                )
                for j in range(values.shape[1])
            )
            if k
            else ()
        )
        if any(e.mean - z * e.se > 0 for e in estimates):
            verdict = INFEASIBLE
        elif all(e.mean + z * e.se <= 0 for e in estimates):
            verdict = FEASIBLE
        else:
            verdict = UNDECIDED
        futile = (
            verdict == UNDECIDED
            and z_futile is not None
            and futility_samples <= n < population
            and any(e.mean - z_futile * e.se > 0 for e in estimates)
        )
        if futile:
            verdict = INFEASIBLE
        if n == population:  # exact: the point value decides
            verdict = INFEASIBLE if any(e.mean > 0 for e in estimates) else FEASIBLE
        taken.append(Look(n, estimates, verdict))
        if verdict != UNDECIDED or (stop_after is not None and number >= stop_after):
            return Decision(verdict, estimates, n, tuple(taken), futile=futile)
    raise AssertionError("unreachable: the last look is exact")


def value_width(metric: object, values: torch.Tensor) -> float:
    """The span one per-sample value can take: the metric's ``value_range``, else the span of
    ``values`` (1 if they are all equal)."""
    low_high = getattr(metric, "value_range", None)
    width = (low_high[1] - low_high[0]) if low_high else float(values.max() - values.min())
    return width if width > 0 else 1.0


def paired_drop(baseline: torch.Tensor, values: torch.Tensor, width: float) -> Estimate:
    """The mean of ``baseline - values`` over the same samples, with its standard error; the
    variance is floored by ``PRIOR_WEIGHT`` pseudo-samples of the largest a difference can have (it
    spans twice ``width``: (2w)^2 / 4), so a drop of exactly 0 on every sample does not claim s.e. 0."""
    return mean_estimate(baseline - values, prior_variance=width**2, prior_weight=PRIOR_WEIGHT)


# --- the session: state shared by every trial of one compress call -------------------------------


@dataclass
class Evaluation:
    """One candidate's sequential evaluation, in the units of the metric."""

    metric: float  # estimate of the candidate's metric on the validation set
    metric_se: float  # its standard error as an estimate for new data (no finite-population correction)
    constraint_values: dict[int, float]  # position in the constraint list -> estimated value
    decision: Decision
    samples: int  # forward passes of the candidate on validation samples (this evaluation's)
    level: str  # "screen", "full", "verify" or "probe"
    values: torch.Tensor = field(repr=False)  # the candidate's per-sample values at the seen samples

    @property
    def capped(self) -> bool:
        """A full evaluation that reached ``trial_samples`` undecided: its constraint values are
        estimates, and it is not the answer unless a verification accepts it."""
        return self.level == "full" and self.decision.verdict == UNDECIDED


class SequentialSession:
    """Per-run state: the fixed sample order, the search/certification split and the original
    model's per-sample values (computed once; every candidate is paired with them)."""

    def __init__(self, config: Sequential, metric: SampleMetric, constraints: Sequence[Constraint], seed: int) -> None:
        if not isinstance(metric, SampleMetric):
            raise ConfigError(
                "evaluation=Sequential(...) needs a metric with per-sample values: tightfit.Accuracy, Agreement, "
                "Fidelity, PerSample(fn, loader), or any object with `num_samples`, `samples_evaluated` and "
                "`per_sample(model, indices)`. Pass evaluation=None to evaluate a plain callable on the full set."
            )
        self.config = config
        self.metric = metric
        self.baseline_values: torch.Tensor | None = None
        self._prior: list[float] = []
        self._width = 1.0
        self.judge(constraints)
        n = int(metric.num_samples)
        n_cert = int(round(n * config.certify_fraction))
        if n - n_cert < 2:
            raise ConfigError(
                f"Sequential: the validation set has {n} samples; too few to hold out {n_cert} and search on the rest."
            )
        generator = torch.Generator().manual_seed(config.seed if config.seed is not None else seed)
        self.order = torch.randperm(n, generator=generator)
        self.search_idx = self.order[: n - n_cert]
        self.certify_idx = self.order[n - n_cert :]
        self.looks = look_schedule(len(self.search_idx), config.first_look, config.growth)
        self._confirmed: tuple[nn.Module, torch.Tensor] | None = None
        #: capped candidates' per-sample values by trial number (this process's), so that their
        #: verification after the search does not read them again
        self.capped: dict[int, torch.Tensor] = {}

    def baseline(self, original: nn.Module) -> float:
        """The original's metric on the full validation set; its per-sample values are kept."""
        if self.baseline_values is None:
            self.baseline_values = self.metric.per_sample(original).to(torch.float64)
            width = self._width = value_width(self.metric, self.baseline_values)
            self._prior = [form.prior_variance(width) for form in self._forms]
        return float(self.baseline_values.mean())

    def judge(self, constraints: Sequence[Constraint]) -> None:
        """Decide and certify ``constraints`` from now on (set at construction; again for the answer's
        after a search held to a looser ``search_constraint``: its certificate must be of what the
        user asked for)."""
        self.constraints = list(constraints)
        self.linear, self.fixed, self.other = per_sample_constraints(self.constraints)
        self._forms = [_Linear(self.constraints[i]) for i in self.linear]
        if self.baseline_values is not None:
            self._prior = [form.prior_variance(self._width) for form in self._forms]

    def _statistic(self, candidate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert self.baseline_values is not None  # baseline() runs before any candidate
        base = self.baseline_values[index]
        if not self._forms:
            return torch.zeros(len(index), 0, dtype=torch.float64)
        return torch.stack([form.values(candidate, base) for form in self._forms], dim=1)

    def evaluate(self, model: nn.Module, *, level: str, seen: torch.Tensor | None = None) -> Evaluation:
        """Evaluate ``model`` on the search set: the sequential test up to ``trial_samples``
        (``level="full"``; undecided there, the evaluation is ``capped``), to the end of the search
        set (``"verify"``; ``seen``: the model's values on a prefix of the order, read before and
        not read again), the first look only (``"screen"``) or up to ``probe_samples`` (``"probe"``)."""
        if self.baseline_values is None:
            raise RuntimeError("SequentialSession.baseline(original) must run first")
        collected: list[torch.Tensor] = []
        # a metric constraint of unknown form cannot be decided early: read the whole search set
        looks = self.looks if not self.other or level == "screen" else [len(self.search_idx)]
        stop_after = 1 if level == "screen" else None
        trial_cap = self.config.trial_samples
        cap = {"probe": self.config.probe_samples, "full": trial_cap, "verify": trial_cap}.get(level)  # screen: none
        if cap is not None and cap < looks[-1]:
            # a trial's later looks stay in the schedule, so the error budget is split as for an
            # uncapped test and its verification takes the same looks; a probe's last look stays the
            # population
            later = [looks[-1]] if level == "probe" else [n for n in looks if n > cap]
            looks = [n for n in looks if n < cap] + [cap] + later
            stop_after = looks.index(cap) + 1 if level != "verify" else None
        known = seen.to(torch.float64) if seen is not None and level == "verify" else torch.zeros(0)

        def statistic(start: int, stop: int) -> torch.Tensor:
            index = self.search_idx[start:stop]
            have = max(0, min(stop, len(known)) - start)
            parts = [known[start : start + have]] if have else []
            if start + have < stop:
                parts.append(self.metric.per_sample(model, index[have:]).to(torch.float64))
            values = torch.cat(parts)
            collected.append(values)
            return self._statistic(values, index)

        # the futility boundary only for a full evaluation or a verification: a screen takes one
        # look, a probe is capped
        futility = self.config.futility if level in ("full", "verify") else 0.0
        decision = sequential_test(
            statistic,
            looks,
            confidence=self.config.confidence,
            prior_variances=self._prior,
            stop_after=stop_after,
            futility=futility,
            futility_samples=self.config.futility_samples,
        )
        values = torch.cat(collected)
        n = decision.samples
        index = self.search_idx[:n]
        # difference estimator: the original's full-set value minus the paired drop on the seen samples
        baseline_full = float(self.baseline_values.mean())
        paired = paired_drop(self.baseline_values[index], values, self._width)
        metric = baseline_full - paired.mean
        constraint_values = {pos: est.mean for pos, est in zip(self.linear, decision.estimates)}
        read = n - min(n, len(known))
        return Evaluation(metric, paired.se, constraint_values, decision, read, level, values)

    def estimate(self, model: nn.Module) -> float:
        """The metric of ``model`` as the sequential test reads it (no fine-tune): the search's
        probes use this, so they too stop reading once the constraints are decided, and never see
        the held-out samples."""
        return self.evaluate(model, level="probe").metric

    # --- stages of a fine-tune (see .stages) ----------------------------------------------------

    @property
    def stage_size(self) -> int:
        return min(self.config.stage_samples, len(self.search_idx))

    @property
    def stage_z(self) -> float:
        """One-sided, Bonferroni over stages and constraints."""
        k = max(1, len(self._forms)) * max(1, len(self.config.stages))
        return z_value(2 * (1 - self.config.confidence) / k)

    @property
    def stages_calibratable(self) -> bool:
        """Whether some constraint has a per-sample linear form the fine-tune's stages can look at."""
        return bool(self._forms)

    def stage_values(self, model: nn.Module, seen: torch.Tensor | None = None) -> torch.Tensor:
        """``model``'s per-sample metric values on the stage samples (the first ``stage_size`` of the
        search order); ``seen``: its values on a prefix of that order, already read."""
        n = self.stage_size
        have = 0 if seen is None else min(n, len(seen))
        parts = [seen[:have]] if seen is not None and have else []
        if have < n:
            parts.append(self.metric.per_sample(model, self.search_idx[have:n]).to(torch.float64))
        return torch.cat(parts)

    def stage_statistics(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample constraint statistics (``stage_size x k``) of stage values."""
        return self._statistic(values, self.search_idx[: len(values)])

    def paired_metric(self, values: torch.Tensor) -> float:
        """The difference estimator of the metric on the whole validation set from the values on a
        prefix of the search order: the original's full-set value minus the paired drop."""
        assert self.baseline_values is not None  # baseline() runs before any candidate
        base = self.baseline_values[self.search_idx[: len(values)]]
        return float(self.baseline_values.mean() - (base - values).mean())

    def stage_estimates(self, statistics: torch.Tensor) -> tuple[Estimate, ...]:
        population = len(self.search_idx)
        return tuple(
            mean_estimate(
                statistics[:, j], population=population, prior_variance=self._prior[j], prior_weight=PRIOR_WEIGHT
            )
            for j in range(statistics.shape[1])
        )

    def gain_se(self, at_stage: torch.Tensor, final: torch.Tensor) -> tuple[float, ...]:
        """Standard errors of the gains (stage minus final, paired on the same samples)."""
        population = len(self.search_idx)
        diff = at_stage - final
        return tuple(mean_estimate(diff[:, j], population=population).se for j in range(diff.shape[1]))

    def validation(self, model: nn.Module) -> float:
        """The metric of ``model`` on the full validation set, held-out samples included: the value the
        result reports (``confirm``) and the one its constraints must hold on. The recovery after the
        search re-checks its trained plans with it: the sequential test never saw their metric, and a
        point estimate on the search set alone let an answer through that broke ``MaxDrop(0.005)`` on
        the full set (fmnist-resnet, 0.9236 < 0.9250; docs/calibration.md)."""
        return float(self.metric.per_sample(model).to(torch.float64).mean())

    def confirm(self, model: nn.Module) -> float:
        """The answer's metric on the full validation set; its per-sample values are kept, so the
        certificate needs no further forward pass."""
        self._confirmed = (model, self.metric.per_sample(model).to(torch.float64))
        return float(self._confirmed[1].mean())

    def certify(self, model: nn.Module) -> Certificate | None:
        """The certificate of ``model`` (after ``confirm(model)``) from the held-out samples."""
        if len(self.certify_idx) < 2 or not self._forms:
            return None
        if self._confirmed is not None and self._confirmed[0] is model:
            values = self._confirmed[1][self.certify_idx]
        else:
            values = self.metric.per_sample(model, self.certify_idx).to(torch.float64)
        stats = self._statistic(values, self.certify_idx)
        # the answer's values on the search samples set the probability's edge prior (no extra
        # forward pass after confirm)
        search = None
        if self._confirmed is not None and self._confirmed[0] is model:
            search = self._statistic(self._confirmed[1][self.search_idx], self.search_idx)
        linear = [self.constraints[i] for i in self.linear]
        value_range = getattr(self.metric, "value_range", None)
        binary = bool(getattr(self.metric, "binary", False))
        forms = [form.form(value_range, binary, prior) for form, prior in zip(self._forms, self._prior)]
        return certify(stats, linear, self.config.confidence, self._prior, forms=forms, search_statistics=search)


__all__ = [
    "Certificate",
    "Decision",
    "Evaluation",
    "FEASIBLE",
    "INFEASIBLE",
    "Look",
    "Sequential",
    "SequentialSession",
    "UNDECIDED",
    "certify",
    "holds",
    "look_schedule",
    "paired_drop",
    "per_sample_constraints",
    "sequential_test",
    "value_width",
]
