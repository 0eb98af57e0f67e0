"""What a search method may know besides the trials: the space, the budget, the seed, and a cheap
way to look at a plan without training (``probe``).

``compress`` builds one :class:`SearchContext` per run; the loop hands a copy re-seeded per trial to
the sampler factory. Probes apply a plan to a copy of the original model and measure it *without*
fine-tuning, so they are a pessimistic, cheap view of a plan (milliseconds on small models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..operators.plan import Plan
from .space import SearchSpace


@dataclass(frozen=True)
class ProbeResult:
    """A plan measured without fine-tuning: the metric, the constraint values (<= 0 met) and the
    objective (the same quantity the search minimizes)."""

    metric: float
    constraints: tuple[float, ...]
    objective: float

    @property
    def violation(self) -> float:
        return max(self.constraints) if self.constraints else 0.0


@dataclass(frozen=True)
class SearchContext:
    """Read-only inputs of a search method. ``probe`` is None when the caller offers none (a
    sampler must then work from the trials alone)."""

    space: SearchSpace
    budget: int
    seed: int = 0
    probe: Callable[[Plan], ProbeResult] | None = None
    #: the original model's weights per layer name (detached), for methods that parametrize by them
    weights: dict[str, Any] = field(default_factory=dict)
    #: the objective's name ("size", "nonzeros", "flops")
    objective: str = "size"
    #: 2 for a Pareto search of (objective, metric); samplers that model one objective use the first
    n_objectives: int = 1
    #: distinct plans the sensitivity scan and the warm starts may probe in the run; None: no bound
    #: beyond the scan's own (``sensitivity.MAX_SCAN_PROBES``). ``compress`` sets it from the budget,
    #: larger with fine-tuning (a trial then costs more than a probe): ``sensitivity.probe_allowance``.
    max_probes: int | None = None
    #: a plan probed on the calibration inputs instead (no validation data): ``metric`` is minus the
    #: outputs' divergence from the original's (tightfit.evaluation.divergence); None without them
    calibration_probe: Callable[[Plan], ProbeResult] | None = None
    #: memo shared by the per-trial copies of one run (e.g. the sensitivity scan; ``EXHAUSTED``)
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def reseeded(self, seed: int) -> SearchContext:
        return dataclasses.replace(self, seed=seed)


#: memo key a sampler sets once every distinct plan of the space is measured or running: the loop
#: then asks for no more trials (a plan measured again gives the same result)
EXHAUSTED = "search.exhausted"
