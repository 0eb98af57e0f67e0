"""``search="mads"``: NOMAD's mesh adaptive direct search (PyNomadBBO), constraints as a
progressive barrier (``PB`` outputs), integer dimensions and categorical choices (bit widths, as
the index of the choice) as NOMAD integer variables.

NOMAD drives its own loop, so the sampler bridges ask/tell by *replay*: each suggestion re-runs
NOMAD from the start with the same seed, answering every point it asks for from the study's
completed trials, until it asks for a point nobody evaluated yet; that point is the suggestion
(NOMAD is then stopped by its evaluation cap; callback exceptions cannot stop it).
NOMAD is deterministic under its seed, so the replay retraces the same path; re-running a few
hundred cached evaluations costs milliseconds, and a fresh sampler per trial (and a resumed run)
needs no state of its own.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState

from .base import PlanSampler
from .context import SearchContext
from .encoding import in_space
from .sensitivity import warm_start_point
from .space import numeric_range


class MadsSampler(PlanSampler):
    def __init__(self, context: SearchContext) -> None:
        super().__init__(context)
        self.dims = list(context.space.dimensions)

    # NOMAD's variables: floats and ints in their own ranges, categoricals as the choice index.
    def _bounds(self) -> tuple[list[float], list[float], list[str]]:
        lb: list[float] = []
        ub: list[float] = []
        kinds: list[str] = []
        for dim in self.dims:
            hp = dim.hyperparameter
            if hp.choices is not None:
                low, high, kind = 0.0, float(len(hp.choices) - 1), "I"
            else:
                (low, high), kind = numeric_range(hp), "I" if hp.integer else "R"
            lb.append(low)
            ub.append(high)
            kinds.append(kind)
        return lb, ub, kinds

    def _to_params(self, v: list[float]) -> dict[str, Any]:
        params = {}
        for dim, value in zip(self.dims, v):
            hp = dim.hyperparameter
            if hp.choices is not None:
                params[dim.key] = hp.choices[int(round(value))]
            elif hp.integer:
                params[dim.key] = int(round(value))
            else:
                low, high = numeric_range(hp)
                params[dim.key] = float(min(max(value, low), high))
        return params

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(
            round(float(params[d.key]), 9) if not isinstance(params[d.key], str) else params[d.key] for d in self.dims
        )

    def _x0(self, lb: list[float], ub: list[float]) -> list[float]:
        params = self.encoding.decode(warm_start_point(self.context, self.encoding))
        x0 = []
        for dim in self.dims:
            hp = dim.hyperparameter
            value = params[dim.key]
            x0.append(float(hp.choices.index(value)) if hp.choices is not None else float(value))
        return x0

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        import PyNomad

        from .gp import one_thread

        keys = self.context.space.keys
        known: dict[tuple, str | None] = {}
        for t in study.get_trials(deepcopy=False):
            if not in_space(t, keys):
                continue
            if t.state == TrialState.COMPLETE and t.values:
                obj = math.log(max(float(t.values[0]), 1e-12))
                cons = [float(t.constraints[k]) for k in sorted(t.constraints, key=int)] if t.constraints else []
                known[self._key(t.params)] = " ".join(str(v) for v in [obj, *cons])
            elif t.state in (TrialState.FAIL, TrialState.RUNNING) and t.number != trial.number:
                known.setdefault(self._key(t.params), None)  # failed or running: report a failed eval
        n_cons = self._n_constraints(study)
        lb, ub, kinds = self._bounds()
        found: dict[str, Any] = {}

        def blackbox(point: Any) -> int:  # a PyNomad evaluation point
            if "params" in found:
                return 0  # NOMAD keeps asking until MAX_BB_EVAL; the suggestion is already made
            v = [point.get_coord(i) for i in range(point.size())]
            params = self._to_params(v)
            key = self._key(params)
            if key in known:
                outputs = known[key]
                if outputs is None:
                    return 0
                point.setBBO(outputs.encode())
                return 1
            found["params"] = params
            return 0

        out_types = " ".join(["OBJ"] + ["PB"] * n_cons)
        options = [
            f"DIMENSION {len(self.dims)}",
            f"BB_OUTPUT_TYPE {out_types}",
            f"BB_INPUT_TYPE ({' '.join(kinds)})",
            f"MAX_BB_EVAL {len(known) + 1}",
            f"SEED {self.context.seed % 10000 + 1}",
            "DISPLAY_DEGREE 0",
            "NB_THREADS_PARALLEL_EVAL 1",
        ]
        with one_thread():
            PyNomad.optimize(blackbox, self._x0(lb, ub), lb, ub, options)
        if "params" in found:
            return found["params"]
        return {}  # NOMAD stopped (mesh converged): the remaining trials are sampled at random

    def _n_constraints(self, study: optuna.Study) -> int:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.constraints:
                return len(t.constraints)
        return 1

    def propose(self, history, study):  # pragma: no cover - sample_relative is overridden
        return None
