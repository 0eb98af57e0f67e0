"""``search="bo"``: constrained Bayesian optimization over the per-layer plan, on BoTorch.

1. The floor: the first trials (at most ``UNIFORM_TRIALS``) bisect the uniform family (one setting
   for every layer) over its distinct plans, so the best uniform plan they reach is a trial and the
   answer is at least as small. No probe is made before the first trial.
1b. Where the strategy prunes by magnitude (``magnitude.global_magnitude_family``: unstructured,
   uncalibrated, no N:M pattern), the next trials (at most ``global_trials``) bisect the global
   magnitude family the same way: one threshold on ``|w|`` across the pruned layers sets every
   layer's sparsity, the other dimensions gentle. A screened trial of it (cheap evaluation: its
   plan could not beat the incumbent) counts as a step from below: a smaller knob is a larger plan.
   Without such pruning there is no such phase and nothing else changes.
2. Warm start: the per-layer sensitivity scan (probes, no fine-tune; within the run's probe
   allowance, ``SearchContext.max_probes``) gives a one-knob family of plans that compress
   insensitive layers first; the next ``n_init`` evaluations search that knob with the level-set
   rule (``levelset.next_knob``). Skipped when no scan fits the allowance, and when the global
   magnitude bisection found a feasible plan (``_global_met``): no scan is made then, and its
   trials go to BO.
3. Then trust-region BO (as in TuRBO / SCBO): GPs of ``-log(objective)`` and of the constraint
   value (observed noise = ``metric_se``² when trials carry it), acquisition = log expected
   improvement x probability of feasibility (``LogConstrainedExpectedImprovement``), or
   ``qLogNoisyExpectedImprovement`` with the constraint when other workers' trials are running
   (they are its ``X_pending``, so parallel workers get a batch of distinct suggestions), maximized
   by ``optimize_acqf`` inside a box around the best feasible plan. The box doubles after
   successes and halves after failures; its state is replayed from the trial history, so a fresh
   sampler (one per trial, as the loop makes them) and a resumed run agree.

A suggestion whose plan was measured already (or is pending) is replaced by the acquisition's best
unmeasured plan among Sobol points of the trust region (``_best_unmeasured``), else of the whole
cube (every plan, in a small discrete space); a warm-start knob whose plan was measured gives way
to a BO step. Once every plan of a small discrete space is measured the search stops
(``context.EXHAUSTED``).

Each BO step warm-starts its two GP fits from the hyperparameters the previous step fitted, with
fewer L-BFGS iterations (``gp.WARM_MAXITER``), except every ``COLD_EVERY`` completed trials. The
fitted hyperparameters are stored on the trial as system attribute ``GP_ATTR`` with the
suggestion and read back from the latest earlier trial that has them, so the per-trial samplers
and a resumed run fit exactly what an uninterrupted run fits.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna

from ..optuna_compat import set_trial_system_attr
from ..run_dir import GP_ATTR
from .base import INCUMBENT_ATTR, History, PlanSampler
from .context import EXHAUSTED, SearchContext
from .levelset import bisect_segments, knob_of, knob_table, next_knob, segments, uniform_family
from .magnitude import global_magnitude_family
from .sensitivity import largest_feasible_knob, probes_left, sensitivity_scan

log = logging.getLogger("tightfit")

LENGTH_INIT, LENGTH_MIN, LENGTH_MAX = 0.4, 0.025, 1.0

# GP_ATTR: trial system attribute, the GP hyperparameters fitted for this trial's suggestion
#: every this many completed trials the GPs are fitted from their priors again: a warm start can
#: stay in a worse local optimum of the likelihood for a few trials (measured: docs/benchmarks.md)
COLD_EVERY = 5

#: the acquisition's L-BFGS stops when an iteration improves it by less than this relative amount
#: (BoTorch's default is 2.2e-9; on the replayed digits search 1e-4 reached the same values, median
#: 8e-6 in log-acquisition from the heavy reference as against 2e-12, largest gap unchanged, with a
#: fifth fewer evaluations)
ACQ_FTOL = 1e-4


def acquisition_effort(d: int) -> tuple[int, int, int]:
    """Default ``(num_restarts, raw_samples, maxiter)`` of the acquisition optimization for ``d``
    searched dimensions (see docs/search.md for the measurement behind them)."""
    if d > 20:  # wide spaces: a suggestion near a second at 100 trials x 50 dimensions
        return 4, 128, 30
    return min(3, max(2, d)), min(256, 64 * d), 30


def default_n_init(budget: int) -> int:
    return int(min(8, max(2, budget // 5)))


#: trials the uniform bisection takes at most (``BOSampler._uniform_phase``): a family of bit widths
#: is bisected in 2-3, a sparsity to 1/32 of its range in 5
UNIFORM_TRIALS = 5


def uniform_trials(budget: int) -> int:
    return int(min(UNIFORM_TRIALS, max(3, budget // 6)))


#: trials the global magnitude bisection takes at most (``BOSampler._global_phase``): 8 halvings place
#: the threshold within 1/256 of the range. On fmnist-resnet (budget 30, no fine-tune) 6 stopped at
#: global sparsity 0.355 (5.39x), short of the benchmark's 11-step edge at 0.365 (5.45x; docs/evidence.md)
GLOBAL_TRIALS = 8


def global_trials(budget: int) -> int:
    return int(min(GLOBAL_TRIALS, max(3, budget // 4 + 1)))


def trust_region_length(history: History, start: int, d: int) -> float:
    """Replay TuRBO's success/failure counters over trials ``start..n``."""
    length = LENGTH_INIT
    succ = fail = 0
    fail_tol = max(2, min(d, 5))
    best = None
    for i in range(history.n):
        ok = history.judged[i] <= 0
        improved = ok and (best is None or history.objective[i] < best * (1 - 1e-3))
        if ok and (best is None or history.objective[i] < best):
            best = history.objective[i]
        if i < start:
            continue
        if improved:
            succ, fail = succ + 1, 0
        else:
            succ, fail = 0, fail + 1
        if succ >= 2:
            length, succ = min(2 * length, LENGTH_MAX), 0
        if fail >= fail_tol:
            length, fail = length / 2, 0
        if length < LENGTH_MIN:
            length = LENGTH_INIT  # restart around the best point
    return length


class BOSampler(PlanSampler):
    def __init__(
        self,
        context: SearchContext,
        *,
        num_restarts: int | None = None,
        raw_samples: int | None = None,
        n_init: int | None = None,
        maxiter: int | None = None,
    ) -> None:
        super().__init__(context)
        restarts, raw, iters = acquisition_effort(self.encoding.d)
        self.num_restarts = num_restarts or restarts
        self.raw_samples = raw_samples or raw
        self.n_init = default_n_init(context.budget) if n_init is None else n_init
        self.maxiter = maxiter or iters
        self._trial: optuna.trial.FrozenTrial | None = None

    def sample_relative(self, study, trial, search_space):
        self._trial = trial  # where _bo_step stores its fitted hyperparameters
        return super().sample_relative(study, trial, search_space)

    def family(self):
        scan = sensitivity_scan(self.context)
        return scan.family if scan is not None else uniform_family(self.encoding)

    def propose(self, history: History, study: optuna.Study) -> np.ndarray | None:
        end, knob = self._uniform_phase(history)
        if knob is not None:
            return uniform_family(self.encoding)(knob)
        floor_end = end
        end, point = self._global_phase(history, end)
        if point is not None:
            return point
        warm = self.n_init if not self._global_met(history, floor_end, end) else 0
        scanned = warm > 0 and sensitivity_scan(self.context) is not None
        warm_end = end + (warm if scanned else 0)
        if history.n < warm_end or history.n < 2:
            x = self._warm_start(history, end)
            # the level-set rule sees only the warm start's own trials, and a wide segment of its
            # family is one plan: on mnist1d it chose the bisection's uniform 4 bits 4 times
            if history.n < 2 or not _already_measured(self._plan_of(x), self._seen(history)):
                return x
        return self._bo_step(history, study, warm_end)

    def _plan_of(self, u: np.ndarray) -> np.ndarray:
        """The point of the plan ``u`` decodes to: a bit-width coordinate anywhere in its choice's
        slice is the same plan."""
        return self.encoding.encode(self.encoding.decode(u))

    def _seen(self, history: History) -> np.ndarray:
        """The plans measured or running, as points (``_plan_of``)."""
        rows = np.vstack([history.x, history.pending]) if len(history.pending) else history.x
        return np.array([self._plan_of(u) for u in rows]).reshape(len(rows), self.encoding.d)

    def _uniform_phase(self, history: History) -> tuple[int, float | None]:
        """The floor: the first trials bisect the uniform family (one setting for every layer,
        ``levelset.uniform_family``) over its distinct plans, so the best uniform plan they reach is
        among the trials and the answer is at least as small. Returns (trials the bisection took,
        its next knob, or None once it is done: the edge found or ``uniform_trials`` spent)."""
        family = uniform_family(self.encoding)
        memo = self.context.memo
        if "bo.uniform" not in memo:  # fixed for the run, as the space is
            table = knob_table(family)
            # the table's plans as a trial's point encodes them (a bit width's coordinate anywhere
            # in its slice is one plan), to recognise the family's screened plans
            plans = np.array([self._plan_of(row) for row in table])
            memo["bo.uniform"] = (table, segments(self.encoding, family), plans)
        table, starts, plans = memo["bo.uniform"]
        cap = uniform_trials(self.context.budget)
        knobs = knob_of(history.x, family, table=table) if history.n else np.zeros(0)
        # a plan of this bisection that cheap evaluation only screened was no smaller than the
        # incumbent: taken as feasible and counted, as in the global phase. Left out (a PRUNED trial
        # is not in the history), the bisection proposed it again until the budget ran out
        # (fmnist-resnet, trial_samples=1024, seed 2: trials 4-29 one plan, screened 26 times)
        screened = [q for q in (self._plan_of(p) for p in history.screened) if _already_measured(q, plans)]
        extra = knob_of(np.vstack(screened), family, table=plans) if screened else np.zeros(0)
        for k in range(min(history.n, cap) + 1):
            last = k == history.n
            points = np.concatenate([knobs[:k], extra]) if last else knobs[:k]
            judged = np.concatenate([history.judged[:k], -np.ones(len(extra))]) if last else history.judged[:k]
            knob = bisect_segments(points, judged, starts)
            if knob is None or k + (len(extra) if last else 0) >= cap:
                return k, None
            if last:
                return k, knob
        return cap, None  # not reached: the loop returns at k == min(n, cap)

    def _global_phase(self, history: History, first: int) -> tuple[int, np.ndarray | None]:
        """After the uniform floor (trials ``..first``), bisect the global magnitude family
        (``magnitude.global_magnitude_family``) over its distinct plans. Its trials are the rows
        from ``first`` on that lie on the family, and its screened ones (``history.screened``).
        Returns (where its trials in ``history`` end, the next plan or None: no family, the edge
        found or ``global_trials`` spent)."""
        memo = self.context.memo
        if "bo.global" not in memo:  # fixed for the run, as the weights and the space are
            family = global_magnitude_family(self.context, self.encoding)
            memo["bo.global"] = (
                None if family is None else (family, knob_table(family), segments(self.encoding, family))
            )
        if memo["bo.global"] is None:
            return first, None
        family, table, starts = memo["bo.global"]
        own = _leading_on_family(history.x[first:], table)
        screened = self._global_screened(history)
        if own + len(screened) >= global_trials(self.context.budget):
            return first + own, None
        points = np.vstack([history.x[first : first + own], *[p[None, :] for p in screened]])
        knobs = knob_of(points, family, table=table) if len(points) else np.zeros(0)
        violation = np.concatenate([history.judged[first : first + own], -np.ones(len(screened))])
        knob = bisect_segments(knobs, violation, starts)
        return first + own, None if knob is None else family(knob)

    def _global_met(self, history: History, first: int, end: int) -> bool:
        """Whether the global magnitude bisection (trials ``first..end``) found a feasible plan: then
        the sensitivity warm start is skipped and its trials go to BO. After such a bisection the warm
        start found nothing better in any measured run: on fmnist-resnet (budget 30, seeds 0-2) its
        6 trials gave 4.6x feasible and 7.7-20x infeasible against the bisection's 5.41x, on
        fmnist-mobilenet (budget 100) 3.9-4.2x feasible against 4.39x, and the scan cost a quarter of
        the run's validation images (docs/search.md, "The warm start after a global bisection")."""
        if end <= first:
            return False
        return bool((history.judged[first:end] <= 0).any()) or bool(self._global_screened(history))

    def _global_screened(self, history: History) -> list[np.ndarray]:
        """The global family's plans that cheap evaluation only screened (none without the family)."""
        memo = self.context.memo.get("bo.global")
        return [] if memo is None else [p for p in history.screened if _already_measured(p, memo[1])]

    def _warm_start(self, history: History, first: int) -> np.ndarray:
        """The sensitivity family's knob searched with the level-set rule, from trial ``first`` on."""
        family = self.family()
        table = self.context.memo.get("bo.knob_table")
        if table is None:  # the family is fixed for the run (the scan is memoized), so is its table
            table = self.context.memo["bo.knob_table"] = knob_table(family)
        own = history.x[first:]
        u = knob_of(own, family, table=table) if len(own) else np.zeros(0)
        pending = knob_of(history.pending, family, table=table) if len(history.pending) else np.zeros(0)
        scan = sensitivity_scan(self.context)
        if scan is not None and probes_left(self.context) == 0 and "bo.start" not in self.context.memo:
            self.context.memo["bo.start"] = scan.safe_knob()  # the allowance went to the scan
        start = largest_feasible_knob(self.context, family, "bo.start")
        se = history.se[first:] if history.n and not np.isnan(history.se).any() else None
        return family(
            next_knob(u, history.violation[first:], se, start=start, pending=pending, judged=history.judged[first:])
        )

    def _bo_step(self, history: History, study: optuna.Study, warm_end: int) -> np.ndarray:
        from botorch.models import ModelListGP

        y_obj = -np.log(np.maximum(history.objective, 1e-12))
        obj_gp, con_gp = self._fit_gps(history, study, y_obj)
        model = ModelListGP(obj_gp, con_gp)

        best = _robust_best(history, con_gp)
        if best is not None and self._trial is not None:
            set_trial_system_attr(study, self._trial, INCUMBENT_ATTR, float(history.objective[best]))
        center = history.x[best] if best is not None else history.x[int(np.argmin(history.violation))]
        length = trust_region_length(history, warm_end, self.encoding.d)
        lo, hi = _trust_region_box(center, length, obj_gp, self.encoding.d)
        acq = _acquisition(model, history, y_obj, best, seed=self.context.seed + history.n)
        return self._unmeasured(acq, self._maximize(acq, lo, hi), lo, hi, history)

    def _unmeasured(self, acq: Any, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, history: History) -> np.ndarray:
        """``x`` if its plan is new, else the acquisition's best new plan among Sobol points of the
        trust region, else of the whole cube (every plan of the space when it has at most
        ``ENUMERATE_PLANS``): a small trust region over bit widths holds few plans, and all of them
        can be measured. Sets ``EXHAUSTED`` once the suggestion is the space's last new plan."""
        plan_of, seen = self._plan_of, self._seen(history)
        memo = self.context.memo
        if "bo.plans" not in memo:  # fixed for the run, as the space is
            memo["bo.plans"] = self.encoding.plans(ENUMERATE_PLANS)
        every = memo["bo.plans"]
        seed = self.context.seed + history.n
        if _already_measured(plan_of(x), seen):
            best = _best_unmeasured(acq, lo, hi, seen, n=self.raw_samples, seed=seed, fallback=None, plan_of=plan_of)
            if best is None:  # the trust region is measured out: widen it to the whole cube
                best = (
                    _best_of(acq, every, seen, plan_of)
                    if every is not None
                    else _best_unmeasured(acq, 0 * lo, 0 * hi + 1, seen, n=self.raw_samples, seed=seed, plan_of=plan_of)
                )
            if best is None and every is None:
                return x  # no new plan among the Sobol points of a large space: a repeat
            if best is None:  # every plan measured or running (a resumed run): one repeat, then stop
                log.info("bo: all %d plans of the space are measured; the search stops", len(every))
                memo[EXHAUSTED] = True
                return x
            x = best
        if every is not None and sum(_already_measured(p, seen) for p in every) + 1 >= len(every):
            memo[EXHAUSTED] = True  # x is the last new plan
        return x

    def _fit_gps(self, history: History, study: optuna.Study, y_obj: np.ndarray) -> tuple[Any, Any]:
        """GPs of the objective (``y_obj``) and of the constraint value, warm-started from the
        previous step's hyperparameters (module doc), which are stored on the trial."""
        import torch

        from .gp import fit_gp, hyperparameters

        se = history.se if not np.isnan(history.se).any() else None
        previous = {} if history.n % COLD_EVERY == 0 else _previous_fit(study, self._trial)
        with torch.random.fork_rng():
            # a fit that fails is retried from hyperparameters drawn from the priors: seeded, so
            # a resumed run draws the same
            torch.manual_seed(self.context.seed % (2**31))
            obj_gp = fit_gp(history.x, y_obj, None, init=previous.get("objective"))
            con_gp = fit_gp(history.x, history.violation, se, init=previous.get("constraint"))
        if self._trial is not None:
            set_trial_system_attr(  # Optuna's own samplers keep their state this way
                study,
                self._trial,
                GP_ATTR,
                {"objective": hyperparameters(obj_gp), "constraint": hyperparameters(con_gp)},
            )
        return obj_gp, con_gp

    def _maximize(self, acq: Any, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The acquisition's maximizer in the box [lo, hi] (seeded: a resumed run finds the same)."""
        import torch
        from botorch.optim import optimize_acqf

        bounds = torch.tensor(np.stack([lo, hi]), dtype=torch.float64)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BoTorch's optimizer warnings are not the user's business
            torch.manual_seed(self.context.seed % (2**31))
            cand, _ = optimize_acqf(
                acq,
                bounds=bounds,
                q=1,
                num_restarts=self.num_restarts,
                raw_samples=self.raw_samples,
                options={
                    "maxiter": self.maxiter,
                    "seed": self.context.seed % (2**31),
                    "factr": ACQ_FTOL / np.finfo(float).eps,
                },
                retry_on_optimization_warning=False,  # a failed local search keeps its best start
            )
        return cand.detach().numpy().reshape(-1)


def _trust_region_box(center: np.ndarray, length: float, obj_gp: Any, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the trust region around ``center``: side ``length``, stretched along the
    objective GP's long lengthscales (their geometric mean kept), clipped to the unit cube."""
    ls = (
        obj_gp.covar_module.lengthscale.detach().numpy().ravel()
        if hasattr(obj_gp.covar_module, "lengthscale")
        else np.ones(d)
    )
    if ls.size != d:
        ls = np.ones(d)
    weights = ls / np.exp(np.mean(np.log(ls)))
    half = np.clip(length * weights / 2, 0.01, 0.5)
    return np.clip(center - half, 0, 1), np.clip(center + half, 0, 1)


def _acquisition(model: Any, history: History, y_obj: np.ndarray, best: int | None, seed: int) -> Any:
    """Noisy EI with the constraint and the running trials as ``X_pending`` when other workers'
    trials are running or cheap evaluation screened some, else log constrained EI over the best
    feasible value (module doc)."""
    import torch
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.acquisition.objective import GenericMCObjective

    if len(history.pending):
        # Built under a seed: its quasi-MC sampler and the pruning of the baseline draw from torch's
        # global generator, so the same history gave another plan from run to run (fmnist-resnet
        # with Sequential(), seed 0: three runs, three different trials 13-29)
        with torch.random.fork_rng():
            torch.manual_seed(seed % (2**31))
            return qLogNoisyExpectedImprovement(
                model,
                X_baseline=torch.as_tensor(history.x, dtype=torch.float64),
                objective=GenericMCObjective(_first_output),
                constraints=[lambda Z: Z[..., 1]],
                X_pending=torch.as_tensor(history.pending, dtype=torch.float64),
                prune_baseline=True,
            )
    best_f = float(y_obj[best]) if best is not None else float(y_obj.min())
    return _independent_log_cei()(model, best_f=best_f, objective_index=0, constraints={1: (None, 0.0)})


#: two plans (as points of the unit cube) closer than this in every coordinate are the same plan: a
#: plan measured again with the same seed gives the same result, yet 21 of 240 trials of 8 digits
#: runs, in both evaluation modes, were such repeats before this guard (benchmarks/bo_repeats.py)
SAME_PLAN = 1e-3

#: a discrete space with at most this many plans is searched plan by plan once the trust region is
#: measured out (and the loop stops once all are measured); a larger one by Sobol points
ENUMERATE_PLANS = 4096


def _leading_on_family(points: np.ndarray, table: np.ndarray) -> int:
    """How many of ``points``, from the first, are plans of the family whose knob table is ``table``."""
    for i, p in enumerate(points):
        if not _already_measured(p, table):
            return i
    return len(points)


def _already_measured(x: np.ndarray, seen: np.ndarray) -> bool:
    return bool(len(seen)) and bool((np.abs(seen - x).max(axis=1) < SAME_PLAN).any())


def _first_output(Z: Any, X: Any = None) -> Any:
    """The objective's column of the model outputs (BoTorch's MC objective signature)."""
    return Z[..., 0]


def _best_unmeasured(
    acq: Any,
    lo: np.ndarray,
    hi: np.ndarray,
    seen: np.ndarray,
    *,
    n: int,
    seed: int,
    fallback: np.ndarray | None = None,
    plan_of: Callable[[np.ndarray], np.ndarray] = lambda u: u,
) -> np.ndarray | None:
    """The acquisition's best point among ``n`` scrambled-Sobol points of the box ``[lo, hi]`` whose
    plan (``plan_of``: the point as the plan it decodes to) is not one measured already or pending
    (``seen``, as plans); ``fallback`` if every one is. Used when the optimizer's answer is a plan
    measured already: the acquisition of a measured plan stays high when its measurement is noisy,
    and the optimizer returns to it."""
    import torch
    from torch.quasirandom import SobolEngine

    points = SobolEngine(len(lo), scramble=True, seed=seed % (2**31)).draw(max(1, n), dtype=torch.float64)
    points = torch.as_tensor(lo) + (torch.as_tensor(hi) - torch.as_tensor(lo)) * points
    best = _best_of(acq, points.numpy(), seen, plan_of)
    return fallback if best is None else best


def _best_of(
    acq: Any, points: np.ndarray, seen: np.ndarray, plan_of: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray | None:
    """The acquisition's best of ``points`` whose plan is not in ``seen``; None if there is none."""
    import torch

    fresh = [p for p in points if not _already_measured(plan_of(p), seen)]
    if not fresh:
        return None
    with torch.no_grad():
        values = acq(torch.as_tensor(np.array(fresh), dtype=torch.float64).unsqueeze(-2))  # q = 1 points
    return fresh[int(torch.argmax(values))]


@functools.cache
def _independent_log_cei() -> type:
    """BoTorch's ``LogConstrainedExpectedImprovement`` for a ``ModelListGP`` of independent
    single-output GPs, with each GP's posterior computed on its own: the same values (bit for bit
    on the replayed digits search), but ``ModelListGP.posterior`` first builds a joint multi-output
    distribution and the base class moves the modules to the input's device on every call, about a
    fifth of the acquisition optimization's time at these sizes (``benchmarks/bo_replay.py``)."""
    import torch
    from botorch.acquisition.analytic import LogConstrainedExpectedImprovement

    from .gp import FastPosterior

    class IndependentLogCEI(LogConstrainedExpectedImprovement):
        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(model, *args, **kwargs)
            # made once per acquisition: the optimizer then evaluates it a few dozen times
            self._fast = [FastPosterior(gp) if FastPosterior.supports(gp) else None for gp in model.models]

        def _mean_and_sigma(self, X: Any, compute_sigma: bool = True, min_var: float = 1e-12) -> tuple[Any, Any]:
            means, sigmas = [], []
            models: Any = self.model.models  # a ModelListGP's
            for gp, fast in zip(models, self._fast):
                if fast is not None:
                    mean, var = fast(X.squeeze(-2))  # remove the q-batch dimension (q = 1)
                    mean, var = mean.unsqueeze(-1), var.unsqueeze(-1)
                else:
                    post = gp.posterior(X)
                    mean, var = post.mean.squeeze(-2), post.variance.squeeze(-2)
                means.append(mean)
                if compute_sigma:
                    sigmas.append(var.clamp_min(min_var).sqrt())
            return torch.cat(means, -1), (torch.cat(sigmas, -1) if compute_sigma else None)

    return IndependentLogCEI


def _previous_fit(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> dict:
    """The GP hyperparameters stored by the latest trial before ``trial`` that has them (any state:
    an interrupted trial's suggestion was made all the same); empty if none has."""
    if trial is None:
        return {}
    latest = None
    for t in study.get_trials(deepcopy=False):
        if t.number < trial.number and GP_ATTR in t.system_attrs and (latest is None or t.number > latest.number):
            latest = t
    return latest.system_attrs[GP_ATTR] if latest is not None else {}


def _robust_best(history: History, con_gp: Any) -> int | None:
    """The best observed feasible trial that the constraint GP also believes feasible (posterior
    mean <= 0). With a constraint at the noise level, the best *observed* feasible point is often a
    lucky draw; centring the trust region and the improvement threshold on it makes the search
    chase noise. Falls back to the best observed feasible trial."""
    from .gp import posterior

    observed = history.best_feasible()
    if observed is None:
        return None
    mean, _ = posterior(con_gp, history.x)
    # a capped trial (cheap evaluation's estimate on a subsample) may be the incumbent on its own
    # estimate once the model agrees: held to ``History.judged`` here too, no capped trial was, every
    # later plan smaller than the last decided one was promoted and read to the cap, and the runs
    # read more for smaller answers (fmnist-resnet, trial_samples=2048, seeds 0-2: 39-43% of full
    # evaluation's images for 5.31-6.07x, against 36-38% for 5.70-6.29x; docs/evidence.md)
    ok = np.flatnonzero((history.violation <= 0) & (mean <= 0))
    if ok.size == 0:
        return observed
    return int(ok[np.argmin(history.objective[ok])])
