"""``search="olmp"``: the OLMP parametrization and its derivative-free search.

Each pruned layer gets a threshold coefficient ``c``: weights with ``|w| < mean|w| + c * std|w|``
are removed (the layer's sparsity follows from its own weight statistics). CMA-ES (the ``cma``
package) searches the coefficients, and any other dimension in [0, 1], with constraints as a
penalty (every infeasible plan ranks below every feasible one, by its violation). The search runs
in rounds, OLMP's prune-and-adjust iteration: each round restarts CMA-ES around the best feasible
plan so far with half the step size, so later rounds adjust a plan that already meets the
constraint (the per-evaluation fine-tune is the weight adjustment).

The sampler keeps no state: each suggestion replays CMA-ES from its seed over the study's trials
in order, telling it the points actually evaluated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from .base import PlanSampler
from .context import SearchContext
from .encoding import in_space
from .sensitivity import warm_start_point
from .space import numeric_range

C_LOW, C_HIGH = -1.5, 4.0
GENERATIONS_PER_ROUND = 3
SIGMA0 = 0.25


class OLMPSampler(PlanSampler):
    def __init__(self, context: SearchContext) -> None:
        super().__init__(context)
        self.dims = list(context.space.dimensions)
        # |w| sorted per pruned layer, so a coefficient maps to a sparsity by one search
        self._mags: dict[int, tuple[np.ndarray, float, float]] = {}
        for i, dim in enumerate(self.dims):
            w = context.weights.get(dim.layer)
            if dim.hyperparameter.name == "sparsity" and w is not None and w.numel() > 1:
                mags = np.sort(w.abs().flatten().double().numpy())
                self._mags[i] = (mags, float(mags.mean()), float(mags.std()))

    # --- the parametrization: z in [0, 1]^d -> plan parameters
    def coefficient(self, i: int, z: float) -> float:
        return C_LOW + z * (C_HIGH - C_LOW)

    def sparsity(self, i: int, c: float) -> float:
        mags, mean, std = self._mags[i]
        return float(np.searchsorted(mags, mean + c * std) / len(mags))

    def to_params(self, z: np.ndarray) -> dict[str, Any]:
        x = np.clip(z, 0, 1).copy()
        params = self.encoding.decode(x)
        for i, dim in enumerate(self.dims):
            if i in self._mags:
                low, high = numeric_range(dim.hyperparameter)
                params[dim.key] = float(min(max(self.sparsity(i, self.coefficient(i, x[i])), low), high))
        return params

    def to_z(self, params: dict[str, Any]) -> np.ndarray:
        z = self.encoding.encode(params)
        for i, dim in enumerate(self.dims):
            if i in self._mags:
                mags, mean, std = self._mags[i]
                s = float(params[dim.key])
                q = mags[min(int(s * len(mags)), len(mags) - 1)]
                c = (q - mean) / std if std > 0 else 0.0
                z[i] = (min(max(c, C_LOW), C_HIGH) - C_LOW) / (C_HIGH - C_LOW)
        return z

    def _x0(self) -> np.ndarray:
        return self.to_z(self.encoding.decode(warm_start_point(self.context, self.encoding)))

    def _new_es(self, x0: np.ndarray, sigma: float, round_index: int) -> Any:  # cma.CMAEvolutionStrategy
        import cma

        opts = {
            "bounds": [0.0, 1.0],
            "seed": int(self.context.seed % 100_000) * 7 + round_index + 1,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        return cma.CMAEvolutionStrategy(list(x0), sigma, opts)

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        keys = self.context.space.keys
        ordered = [
            t
            for t in study.get_trials(deepcopy=False)
            if in_space(t, keys)
            and t.number != trial.number
            and t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
        ]
        evaluated = [(self.to_z(t.params), _fitness(t)) for t in ordered]
        es = self._new_es(self._x0(), SIGMA0, 0)
        popsize = es.popsize
        best_z, best_f = None, math.inf
        pos = 0
        generation = 0
        round_index = 0
        while True:
            asked = es.ask()
            gen = evaluated[pos : pos + popsize]
            if len(gen) < popsize:
                return self.to_params(np.asarray(asked[len(gen)]))
            fs = [f if f is not None else 1e9 for _, f in gen]  # running trials: assume the worst
            es.tell([z for z, _ in gen], fs)
            for z, f in gen:
                if f is not None and f < best_f:
                    best_z, best_f = z, f
            pos += popsize
            generation += 1
            if generation % GENERATIONS_PER_ROUND == 0 or es.stop():
                round_index += 1
                x0 = best_z if best_z is not None and best_f < 1e3 else self._x0()
                es = self._new_es(x0, SIGMA0 / 2**round_index, round_index)

    def propose(self, history, study):  # pragma: no cover - sample_relative is overridden
        return None


def _fitness(t: optuna.trial.FrozenTrial) -> float | None:
    """Log objective when feasible; infeasible plans rank after all feasible ones, by violation."""
    if t.state == TrialState.RUNNING:
        return None
    if t.state != TrialState.COMPLETE or not t.values:
        return 1e6
    violation = max(t.constraints.values()) if t.constraints else 0.0
    obj = math.log(max(float(t.values[0]), 1e-12))
    return obj if violation <= 0 else 1e3 + 100.0 * float(violation)
