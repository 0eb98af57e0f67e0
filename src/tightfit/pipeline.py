"""``tightfit.compress`` (this module is not named compress, so that importing it never shadows
the function on the package): search a compression plan for a trained model under a budget."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from torch import nn

from . import report
from .errors import ConfigError, ModelError
from .evaluation.constraints import Constraint, MaxDrop, MaxLatency, MaxSize, check_max_drop
from .evaluation.metrics import bind_reference, evaluate_metric, evaluate_original
from .evaluation.sequential import Sequential, SequentialSession
from .export.artifact import load_model, to_bytes
from .measure.analysis import SkippedModule, analyze, count_nonzeros, layer_kind, layer_weights, shown_name, sparse_flops, zeroed_note
from .measure.latency import Latency
from .operators.base import Operator
from .operators.compose import Compose, as_strategy, why_not_taken
from .operators.plan import Plan, apply_plan_inplace, fold_weight_norm
from .operators.prune import Prune
from .operators.quantize import Quantize
from .records import Measurement, Result, TrialRecord
from .recovery import recovery_notes
from .run_dir import RunDir
from .search.loop import TrialOutcome, counted_trials, recover_interrupted, run_trials, trial_record
from .search.context import ProbeResult, SearchContext
from .search.requirements import check_requirements
from .search.space import SearchSpace, build_space

log = logging.getLogger("tightfit")

OBJECTIVES = ("size", "nonzeros", "flops", "latency")
#: how compress chooses its answer among the feasible trials (see _final_pick)
PICKS = ("posterior", "observed")
EXAMPLE_INPUT_FILE = "example_input.pt"
BASELINE_ATTR = "tightfit.baseline"
SETTINGS_ATTR = "tightfit.settings"


def _validate(model, evaluate, objective, budget, example_input, finetune, seed) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            "`model` is a TorchScript module (torch.jit.script / torch.jit.trace); compression adds "
            "parametrizations to layers, which a ScriptModule cannot take. Pass the nn.Module it was made from, "
            "and script the result (tightfit export --format torchscript)."
        )
    if not callable(evaluate):
        raise ConfigError("`evaluate` must be a callable(model) -> float (higher is better), e.g. tightfit.Accuracy(val_loader).")
    primary = objective[0] if isinstance(objective, (tuple, list)) and len(objective) == 2 and objective[1] == "metric" else objective
    if primary not in OBJECTIVES:
        raise ConfigError(
            f"`objective` must be one of {OBJECTIVES}, or a pair like ('size', 'metric') for a Pareto front, "
            f"but got {objective!r}."
        )
    if primary in ("flops", "latency") and example_input is None:
        raise ConfigError(f'`objective="{primary}"` needs `example_input` (an input tensor, tuple of args or dict of kwargs).')
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"`budget` must be a whole number of evaluations >= 1, but got {budget!r}.")
    if finetune is not None and not callable(finetune):
        raise ConfigError("`finetune` must be None, tightfit.FineTune(...), or a callable(model) -> None.")
    if not isinstance(seed, int):
        raise ConfigError(f"`seed` must be an int, but got {seed!r}.")


def _compiled_original(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper holds, or None for any other model."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else None


def _check_evaluation(evaluation) -> None:
    if evaluation is not None and not isinstance(evaluation, Sequential):
        raise ConfigError(
            f"`evaluation` must be None (every candidate on the full validation set) or tightfit.Sequential(...), "
            f"but got {evaluation!r}."
        )


def _tuned_hyperparameters(finetune: Any) -> list:
    """Tuned recovery: a ``finetune`` that declares ``hyperparameters()`` and ``with_settings()``
    has those searched with the plan (see tightfit.recovery.Tuned)."""
    if finetune is None or not (hasattr(finetune, "hyperparameters") and hasattr(finetune, "with_settings")):
        return []
    return list(finetune.hyperparameters())


def _constraints(constraint: Constraint | Sequence[Constraint] | None) -> list[Constraint]:
    if constraint is None:
        items = [MaxDrop(0.01)]
    elif isinstance(constraint, Constraint):
        items = [constraint]
    elif isinstance(constraint, (list, tuple)) and constraint:
        items = list(constraint)
    else:
        items = [constraint]
    for c in items:
        if not isinstance(c, Constraint):
            raise ConfigError(f"`constraint` must be a tightfit constraint such as MaxDrop(0.005), but got {c!r}.")
    return items


def float32_file_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the file a user ships without tightfit."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _latency_for(latency: Latency | None, objective: str, constraints: list[Constraint], example_input: Any) -> Latency | None:
    """The latency meter of this run: the one given, or a default one when latency is asked for."""
    if latency is not None:
        if not isinstance(latency, Latency):
            raise ConfigError(f"`latency` must be tightfit.Latency(example_input, ...), but got {type(latency).__name__}.")
        return latency
    if objective == "latency" or any(isinstance(c, MaxLatency) for c in constraints):
        if example_input is None:
            raise ConfigError("Latency objectives and MaxLatency need `example_input` (or `latency=tightfit.Latency(...)`).")
        return Latency(example_input)
    return None


def _timed(latency: Latency | None, model: nn.Module) -> dict[str, float | None]:
    if latency is None:
        return {"latency_ms": None, "latency_iqr_ms": None}
    measured = latency(model)
    return {"latency_ms": measured.median_ms, "latency_iqr_ms": measured.iqr_ms}


def _original_flops(original, example_input, layer_names, objective) -> int | None:
    """The original's FLOPs on ``example_input``, or None when they cannot be counted there (an
    error only when they are the objective). Counted once: the baseline reuses the number."""
    if example_input is None:
        return None
    try:
        return sparse_flops(original, example_input, layer_names)
    except Exception as exc:
        if objective == "flops":
            raise ConfigError(
                f"`example_input` does not run through the model under torch's FLOP counter "
                f"({type(exc).__name__}: {exc}); give an input the model's forward accepts."
            ) from exc
        log.warning("FLOPs are not counted: the model fails on example_input (%s: %s)", type(exc).__name__, exc)
        return None


def _measure_baseline(original, evaluate, layer_names, flops: int | None, latency=None) -> Measurement:
    nonzeros, total = count_nonzeros(original, layer_names)
    return Measurement(
        **_timed(latency, original),
        metric=evaluate_original(evaluate, copy.deepcopy(original)),  # says it was the original's evaluation
        size_bytes=float32_file_bytes(original),
        nonzeros=nonzeros,
        weight_params=total,
        flops=flops,
    )


def _better(a: TrialRecord, b: TrialRecord | None) -> bool:
    """Smaller objective wins; ties go to the higher metric, then the earlier trial."""
    if b is None:
        return True
    if a.objective is None or b.objective is None:
        return b.objective is None
    if a.objective != b.objective:
        return a.objective < b.objective
    if a.measurement.metric != b.measurement.metric:
        return a.measurement.metric > b.measurement.metric
    return a.number < b.number


def best_feasible(trials: Sequence[TrialRecord]) -> TrialRecord | None:
    best = None
    for t in trials:
        # a candidate cheap evaluation only screened or stopped mid-fine-tune is never the answer
        if t.feasible and t.measurement is not None and t.fidelity not in ("screen", "stopped") and _better(t, best):
            best = t
    return best


def pareto_front(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Completed trials not dominated in (metric up, size down), sorted by size."""
    done = [t for t in trials if t.state == "COMPLETE" and t.measurement is not None]
    front = []
    for t in done:
        m = t.measurement
        dominated = any(
            o.measurement.metric >= m.metric
            and o.measurement.size_bytes <= m.size_bytes
            and (o.measurement.metric > m.metric or o.measurement.size_bytes < m.size_bytes)
            for o in done
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.measurement.size_bytes, -t.measurement.metric))


def compress(
    model: nn.Module,
    *,
    evaluate: Callable[[nn.Module], float],
    strategy: Compose | Operator | None = None,
    constraint: Constraint | Sequence[Constraint] | None = None,
    objective: str | tuple[str, str] = "size",
    finetune: Callable[[nn.Module], None] | None = None,
    budget: int = 30,
    search: str = "auto",
    example_input: Any = None,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    storage: str | BaseStorage | None = None,
    study_name: str = "tightfit",
    progress: bool = False,
    artifact_extra: dict[str, Any] | None = None,
    on_start: Callable[[str, str], None] | None = None,
    latency: Latency | None = None,
    evaluation: Sequential | None = None,
    pick: str = "posterior",
) -> Result:
    """Search a compression plan for ``model`` that meets ``constraint`` and minimizes ``objective``.

    ``model`` is never modified. Each of the ``budget`` evaluations applies a plan to a fresh copy,
    runs ``finetune`` (masks and quantization held), measures ``evaluate`` and the saved file's
    bytes. With ``run_dir``, the study (SQLite), every trial, the best model file, a summary and a
    plot are written there, and calling again with the same arguments resumes the search.
    ``storage`` (a URL such as ``postgresql://…`` or a storage from :func:`tightfit.scale.open_storage`)
    puts the study on a database that workers (:func:`tightfit.scale.work`, ``tightfit worker``) share;
    ``on_start(storage_url, study_name)`` is called once the study is open and the baseline stored
    (``tightfit run --workers`` starts its workers there). This call waits for the other workers'
    running trials before it reports. ``objective="latency"`` (or a ``MaxLatency`` constraint) times
    every trial's saved model with ``latency`` (default ``tightfit.Latency(example_input)``); passing
    ``latency`` alone records it.
    With ``evaluation=tightfit.Sequential(...)``, candidates are evaluated on a growing subsample of
    the validation set until a confidence interval decides the constraints, candidates that cannot
    improve the answer are only screened (no fine-tune), and the answer comes with a certificate
    computed on held-out validation samples (``result.certificate``). ``pick`` chooses the answer
    among the feasible trials: ``"posterior"`` (default) the smallest-objective one that a GP model
    of the constraint over all trials also expects to be feasible, so a lucky measurement is not
    the answer (from 20 completed trials on; docs/search.md), ``"observed"`` the best observed
    feasible trial. See the README for the full walk-through.
    """
    arguments = {name: value for name, value in locals().items() if name != "model"}
    return _search(model, worker=False, **arguments)


def run_arguments(model: nn.Module, **keywords: Any) -> dict[str, Any]:
    """``keywords`` checked against :func:`compress`'s signature, with its defaults filled in."""
    import inspect

    try:
        bound = inspect.signature(compress).bind(model, **keywords)
    except TypeError as exc:
        raise ConfigError(f"{exc} (the arguments are tightfit.compress's).") from None
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "model"}


def _search(
    model: nn.Module, *, worker: bool, evaluate, strategy, constraint, objective, finetune, budget, search,
    example_input, seed, run_dir, storage, study_name, progress, artifact_extra, on_start, latency, evaluation, pick,
) -> Result | int:
    """compress(), or with ``worker=True`` a worker: trials only, returns how many it evaluated.

    The arguments are compress()'s, all of them (its signature holds the types and defaults; a
    worker binds its keywords to it, see :func:`run_arguments`)."""
    _validate(model, evaluate, objective, budget, example_input, finetune, seed)
    _check_evaluation(evaluation)
    compiled = _compiled_original(model)
    if compiled is not None:  # torch.compile's wrapper: compress what it wraps (each copy would recompile)
        model = compiled
    if pick not in PICKS:
        raise ConfigError(f"`pick` must be one of {PICKS}, but got {pick!r}.")
    # ("size", "metric"): a Pareto front of the first objective (minimized) and the metric
    # (maximized); the constraints still decide which plans count.
    multi = not isinstance(objective, str)
    if multi and evaluation is not None:
        raise ConfigError(
            "`evaluation=Sequential(...)` works with one objective; a Pareto objective "
            f"{tuple(objective)!r} needs every candidate measured in full (evaluation=None)."
        )
    objective = objective[0] if multi else objective
    strategy = as_strategy(strategy if strategy is not None else Compose([Prune(), Quantize()]))
    constraints = _constraints(constraint)
    check_requirements(search, strategy, latency)  # known method; optional packages installed

    latency = _latency_for(latency, objective, constraints, example_input)
    if evaluation is not None and latency is not None:
        raise ConfigError(
            "evaluation=Sequential(...) does not time candidates yet: drop the latency objective / MaxLatency / "
            "`latency`, or use evaluation=None."
        )

    try:
        original = copy.deepcopy(model).eval()
    except Exception as exc:
        hint = ("it uses the old torch.nn.utils.weight_norm: switch to torch.nn.utils.parametrizations.weight_norm "
                "(tightfit folds it into the weight) or call torch.nn.utils.remove_weight_norm first"
                if "weight_norm" in str(exc) else "e.g. keep open files or locks out of its attributes")
        raise ModelError(
            f"The model cannot be copied ({type(exc).__name__}: {exc}); tightfit compresses copies and never "
            f"changes your model. Make it deep-copyable ({hint})."
        ) from exc
    weight_normed = fold_weight_norm(original)
    for op in strategy:  # model-level operators (structured pruning) learn the model's structure
        op.prepare(original, example_input)
    analysis = analyze(original)
    space = build_space(strategy, analysis, _tuned_hyperparameters(finetune))  # ModelError if nothing compressible
    layer_names = [layer.name for layer in analysis.layers if layer.name in space.fixed]
    given_input = example_input  # kept for `tightfit export` even when FLOPs cannot be counted on it
    original_flops = _original_flops(original, example_input, layer_names, objective)
    if original_flops is None:
        example_input = None
    settings = {
        "space": space.keys,
        "objective": [objective, "metric"] if multi else objective,
        "constraints": [c.describe() for c in constraints],
        "search": search,
        "seed": seed,
    }
    if latency is not None:
        settings["latency"] = latency.describe()
    evaluate = bind_reference(evaluate, original)  # Agreement / Fidelity compare with the original
    session = None
    if evaluation is not None:
        settings["evaluation"] = evaluation.describe()
        session = SequentialSession(evaluation, evaluate, constraints, seed)
    counter = _ForwardPasses(evaluate)

    with ExitStack() as stack:
        stack.enter_context(_optuna_quiet())
        if worker and storage is None:
            raise ConfigError("A worker needs `storage`: the URL of the study it joins (e.g. postgresql://…).")
        run = stack.enter_context(RunDir.open(run_dir)) if run_dir is not None and not worker else None
        study, url = _open_study(run, storage, study_name, settings, multi)
        if run is not None and url == run.storage_url:
            # We hold the run directory's lock and our workers die with us, so RUNNING trials in the
            # run directory's own SQLite belong to a dead process. Shared storages use heartbeats.
            recovered = recover_interrupted(study)
            if recovered:
                log.warning("resuming: %d interrupted trial(s) will be evaluated again", recovered)

        if run is not None and given_input is not None:
            torch.save(given_input, run.path / EXAMPLE_INPUT_FILE)  # `tightfit export` checks outputs on it
        if session is not None:
            full_metric = session.baseline(original)  # per-sample values, computed once and kept
            baseline = _baseline(study, original, lambda _model: full_metric, layer_names, original_flops, latency)
        else:
            baseline = _baseline(study, original, evaluate, layer_names, original_flops, latency)
        baseline_passes = counter.take()
        check_max_drop(constraints, evaluate, baseline.metric)  # warns of a drop no plan could break
        best_holder: dict[str, Any] = {"record": best_feasible([trial_record(t) for t in study.get_trials()]), "bytes": None}

        def evaluate_plan(plan: Plan, trial: optuna.Trial) -> TrialOutcome:
            counter.take()
            candidate = apply_plan_inplace(plan, copy.deepcopy(original), strategy)
            steps = None
            tuned = space.recovery_settings(trial.params)
            recover = finetune.with_settings(**tuned) if tuned else finetune
            if recover is not None:
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    recover(candidate)
                # measured as the original was, in eval mode, whatever mode a user's recovery left it in:
                # in train mode a metric that does not call eval() reads dropout noise and batch
                # statistics, and its passes would change the BatchNorm statistics saved next
                candidate.eval()
                steps = getattr(recover, "steps_taken", None)
            metric, metric_se = _full_metric(evaluate, candidate)
            data = to_bytes(candidate, plan, {**(artifact_extra or {}), "trial": trial.number})
            nonzeros, _ = count_nonzeros(candidate, layer_names)
            measured = Measurement(
                metric=metric,
                size_bytes=len(data),
                nonzeros=nonzeros,
                weight_params=baseline.weight_params,
                flops=sparse_flops(candidate, example_input, layer_names) if example_input is not None else None,
                **_timed(latency, candidate),
            )
            values = [c.value(measured, baseline) for c in constraints]
            goal = {"size": measured.size_bytes, "nonzeros": measured.nonzeros, "flops": measured.flops,
                    "latency": measured.latency_ms}[objective]
            record = TrialRecord(trial.number, "COMPLETE", plan, measured, float(goal), tuple(values))
            if not worker and record.feasible and _better(record, best_holder["record"]):
                best_holder.update(record=record, bytes=data)
                if run is not None:
                    run.write_best(data)
            return TrialOutcome(
                objective=[float(goal), float(metric)] if multi else float(goal),
                constraints=values,
                attrs={"plan": plan.to_dict(), "measurement": measured.to_dict(), "finetune_steps": steps,
                       "metric_se": metric_se, "val_samples": counter.take(), "fidelity": "full",
                       **({"recovery": tuned} if tuned else {})},
            )

        if session is not None:
            from .evaluation.search_hook import sequential_plan_evaluator

            def recovery_for(trial):
                tuned = space.recovery_settings(trial.params)
                return (finetune.with_settings(**tuned) if tuned else finetune), tuned

            evaluate_plan = sequential_plan_evaluator(  # noqa: F811 - cheap evaluation replaces the full one
                session=session, original=original, strategy=strategy, recovery_for=recovery_for, seed=seed,
                constraints=constraints, baseline=baseline, objective=objective, best_holder=best_holder,
                run=None if worker else run, counter=counter, better=_better, keep_best=not worker,
                static=lambda candidate, plan, number, reuse=None: _static_measure(
                    candidate, plan, number, artifact_extra, layer_names, example_input, baseline, reuse
                ),
            )

        context = _search_context(
            # cheap evaluation: probes are sequential too, and never read the held-out samples
            original, session.estimate if session is not None else evaluate, strategy, space, constraints, baseline,
            objective, budget, seed, layer_names, example_input, n_objectives=2 if multi else 1, latency=latency,
        )
        context, evaluate_plan = _with_probe_cost(context, evaluate_plan, counter)
        if worker:
            return run_trials(study, space, evaluate_plan, budget=budget, method=search, seed=seed, context=context)
        if on_start is not None:
            on_start(url, study_name)
        reporter = stack.enter_context(report.live_progress(budget, baseline, enabled=progress))
        reporter.advance_to(len(counted_trials(study)))
        reporter.add_cost(study.get_trials(deepcopy=False))
        started = time.perf_counter()
        refresher = report.LiveFiles(run.path, baseline, settings) if run is not None else None

        def on_trial(frozen: optuna.trial.FrozenTrial) -> None:
            reporter.on_trial(frozen)
            if refresher is not None or progress:
                trials_now = study.get_trials(deepcopy=False)
                reporter.advance_to(len(counted_trials(study)))  # other workers' trials too
                if refresher is not None:
                    refresher.maybe_write([trial_record(t) for t in trials_now])

        run_trials(
            study, space, evaluate_plan, budget=budget, method=search, seed=seed, on_trial=on_trial, drain=True, context=context
        )

        trials = [trial_record(t) for t in study.get_trials()]
        best_trial, pick_note = _final_pick(study, space, trials, multi or pick == "observed")
        if space.recovery:  # a replayed best trial must train with its own recovery settings
            tuned_of = {t.number: t.user_attrs.get("recovery", {}) for t in study.get_trials(deepcopy=False)}
            if best_trial is not None:
                finetune = finetune.with_settings(**tuned_of.get(best_trial.number, {}))
        counter.take()
        final_metric = session.confirm if session is not None else evaluate
        result = _finish(
            original, final_metric, trials, baseline, objective, best_holder, run, finetune, strategy, seed, layer_names,
            confirmed=session is not None, best=best_trial,
        )
        if pick_note and result.feasible:
            result.notes.insert(0, pick_note)
        if session is not None and result.feasible:
            result.certificate = session.certify(result.model)
            _note_certificate(result, constraints, baseline)
        final_passes = counter.take()
        result.accounting = _accounting(trials, baseline_passes, final_passes, time.perf_counter() - started)
        if multi:  # the front the user asked for: feasible plans only
            result.pareto = pareto_front([t for t in trials if t.feasible])
        result.left_alone = _left_alone(analysis, space)
        result.notes.extend(_partly_refused(space) + _following_note(analysis, space) + _direction_note(evaluate, trials, baseline))
        result.notes.extend(recovery_notes(finetune))  # e.g. an empty training loader trained nothing
        result.notes.extend(zeroed_note(result.model, layer_names) if result.feasible else [])  # a layer pruned to nothing
        if weight_normed:
            shown = ", ".join(weight_normed[:6]) + (f" and {len(weight_normed) - 6} more" if len(weight_normed) > 6 else "")
            result.notes.append(f"Weight norm was folded into the weights of {shown} before compression (they compute "
                                "the same); result.model holds plain weights.")
        if compiled is not None:
            result.notes.append("The model was a torch.compile wrapper; the module it wraps was compressed, and "
                                "result.model is an eager module: call torch.compile on it again.")
        if run is not None:
            report.write_run_files(result, run.path, settings)
        return result


class _ForwardPasses:
    """Counts validation forward passes through a metric's ``samples_evaluated`` (None if it has none)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.last = self._now()

    def _now(self) -> int | None:
        value = getattr(self.metric, "samples_evaluated", None)
        return int(value) if isinstance(value, int) else None

    def take(self) -> int | None:
        """Forward passes since the last call."""
        now = self._now()
        delta = None if now is None or self.last is None else now - self.last
        self.last = now
        return delta


def _with_probe_cost(context: SearchContext, evaluate_plan, counter: _ForwardPasses):
    """Charge each trial with what the optimizer's probes (plans measured without fine-tuning, made
    while it prepared the suggestion) cost: validation samples and seconds, stored as the trial's
    ``probe_samples`` and ``probe_s``."""
    if context.probe is None:
        return context, evaluate_plan
    clock = {"s": 0.0}
    probe = context.probe

    def timed_probe(plan: Plan) -> ProbeResult:
        started = time.perf_counter()
        try:
            return probe(plan)
        finally:
            clock["s"] += time.perf_counter() - started

    def charged(plan: Plan, trial) -> TrialOutcome:
        passes, seconds = counter.take(), clock["s"]
        clock["s"] = 0.0
        outcome = evaluate_plan(plan, trial)
        outcome.attrs.update(probe_samples=passes, probe_s=seconds)
        return outcome

    return dataclasses.replace(context, probe=timed_probe), charged


def _full_metric(evaluate, model: nn.Module) -> tuple[float, float | None]:
    """The metric on the full validation set and, for a per-sample metric, its standard error."""
    per_sample = getattr(evaluate, "per_sample", None)
    if per_sample is None or not hasattr(evaluate, "num_samples"):
        return evaluate_metric(evaluate, model), None
    values = per_sample(model)
    n = values.numel()
    se = float(values.std(unbiased=True) / n**0.5) if n > 1 else None
    return evaluate_metric(lambda _m: float(values.mean()), model), se


def _static_measure(candidate, plan, number, artifact_extra, layer_names, example_input, baseline, reuse=None):
    """What does not need the validation set: the saved file's bytes, nonzeros and FLOPs. With
    ``reuse`` (the same plan measured before fine-tuning, which holds masks), only the file is redone."""
    data = to_bytes(candidate, plan, {**(artifact_extra or {}), "trial": number})
    if reuse is not None:
        return data, Measurement(float("nan"), len(data), reuse.nonzeros, reuse.weight_params, reuse.flops)
    nonzeros, _ = count_nonzeros(candidate, layer_names)
    flops = sparse_flops(candidate, example_input, layer_names) if example_input is not None else None
    return data, Measurement(
        metric=float("nan"), size_bytes=len(data), nonzeros=nonzeros, weight_params=baseline.weight_params, flops=flops
    )


def _accounting(trials: Sequence[TrialRecord], baseline_passes, final_passes, wall_s: float) -> dict[str, Any]:
    """The run's cost: validation forward passes (original, trials, final check), fine-tuning steps,
    wall time. Trial figures are summed over every stored trial, so a resumed run counts all of them."""
    trial_passes = [t.val_samples for t in trials if t.state in ("COMPLETE", "PRUNED")]
    probe_passes = sum(t.probe_samples or 0 for t in trials)
    known = all(p is not None for p in trial_passes) and baseline_passes is not None and final_passes is not None
    by_level: dict[str, dict[str, float]] = {}
    for t in trials:
        if t.fidelity is not None:
            level = by_level.setdefault(t.fidelity, {"trials": 0, "finetune_steps": 0, "val_samples": 0, "wall_s": 0.0})
            level["trials"] += 1
            level["finetune_steps"] += t.finetune_steps or 0
            level["val_samples"] += t.val_samples or 0
            level["wall_s"] += (t.duration_s or 0.0) - (t.search_time_s or 0.0)
    search_s = sum(t.search_time_s or 0.0 for t in trials)
    probe_s = sum(t.probe_s or 0.0 for t in trials)
    return {
        "val_samples": (baseline_passes + sum(trial_passes) + probe_passes + final_passes) if known else None,
        "val_samples_baseline": baseline_passes,
        "val_samples_trials": sum(p or 0 for p in trial_passes),
        "val_samples_probes": probe_passes,
        "val_samples_final": final_passes,
        "finetune_steps": sum(t.finetune_steps or 0 for t in trials),
        "trial_wall_s": sum(t.duration_s or 0.0 for t in trials),
        "search_wall_s": wall_s,
        # the optimizer's time to suggest (GP fits, acquisition), without its probes
        "optimizer_wall_s": search_s - probe_s,
        "probe_wall_s": probe_s,
        "trials_by_fidelity": {name: int(level["trials"]) for name, level in by_level.items()},
        "cost_by_fidelity": by_level,
    }


def _note_certificate(result: Result, constraints, baseline: Measurement) -> None:
    cert = result.certificate
    full = Measurement(result.metric, result.size_bytes, 0, baseline.weight_params)
    violated = [c.describe() for c in constraints if c.value(full, baseline) > 0]
    if violated:
        result.notes.append(
            f"On the full validation set the answer breaks {', '.join(violated)} (metric {result.metric:.4f}); "
            "the search decided on a subsample and the held-out part disagrees. Consider a larger confidence."
        )
    if cert is not None:
        result.notes.append(
            f"Certificate: P(constraints met on new data) = {cert.probability:.3f} from {cert.samples} held-out "
            f"validation samples; {cert.confidence:.0%} upper bound(s) on the constraint value(s): "
            + ", ".join(f"{b:+.4f}" for b in cert.bounds)
            + (" (certified)." if cert.certified else " (not certified at this confidence).")
        )


def _search_context(
    original, evaluate, strategy, space, constraints, baseline, objective, budget, seed, layer_names, example_input,
    n_objectives: int = 1, latency: Latency | None = None,
) -> SearchContext:
    """What samplers may use besides the trials: a probe that measures a plan *without* fine-tuning
    (the sensitivity scan and warm starts use it) and the original weights."""
    needs_bytes = objective == "size" or any(isinstance(c, MaxSize) for c in constraints)
    # With a latency objective or constraint every probe is timed too: slower, but the only honest view.

    def probe(plan: Plan) -> ProbeResult:
        candidate = apply_plan_inplace(plan, copy.deepcopy(original), strategy)
        metric = evaluate_metric(evaluate, candidate)
        nonzeros, _ = count_nonzeros(candidate, layer_names)
        measured = Measurement(
            metric=metric,
            size_bytes=len(to_bytes(candidate, plan)) if needs_bytes else baseline.size_bytes,
            nonzeros=nonzeros,
            weight_params=baseline.weight_params,
            flops=sparse_flops(candidate, example_input, layer_names) if objective == "flops" else None,
            **_timed(latency, candidate),
        )
        goal = {"size": measured.size_bytes, "nonzeros": measured.nonzeros, "flops": measured.flops,
                "latency": measured.latency_ms}[objective]
        return ProbeResult(metric, tuple(c.value(measured, baseline) for c in constraints), float(goal))

    modules = dict(original.named_modules())
    weights = {name: _one_weight(modules[name]) for name in layer_names if layer_kind(modules[name]) is not None}
    return SearchContext(
        space=space, budget=budget, seed=seed, probe=probe, weights=weights, objective=objective, n_objectives=n_objectives
    )


def _one_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as samplers read it (magnitudes): a recurrent layer's matrices as one flat tensor."""
    weights = [w.detach() for w in layer_weights(layer)]
    return weights[0].clone() if len(weights) == 1 else torch.cat([w.reshape(-1) for w in weights])


def _direction_note(evaluate: Any, trials: Sequence[TrialRecord], baseline: Measurement) -> list[str]:
    """A hint when the user's metric looks like an error given as is (higher = worse): every compressed
    model scored clearly (10%) above the original, or most did and the more compressed a model the
    higher it scored. Compression rarely helps a higher-is-better metric that consistently. Not for
    tightfit's own metrics (Accuracy, Agreement, Fidelity), whose direction is known."""
    from .evaluation.metrics import PerSample, PerSampleMetric

    if isinstance(evaluate, PerSampleMetric) and not isinstance(evaluate, PerSample):
        return []
    done = [(t.objective, t.measurement.metric) for t in trials
            if t.state == "COMPLETE" and t.measurement is not None and t.objective is not None
            and math.isfinite(t.measurement.metric) and t.fidelity not in ("screen", "stopped")]
    if len(done) < 3:
        return []
    scored = sorted(metric for _, metric in done)
    clearly_above = baseline.metric + 0.1 * abs(baseline.metric)
    # Spearman's rank correlation of objective (size) and metric: -1 when smaller always scored higher
    rises_with_compression = len(done) >= 4 and _spearman(done) <= -0.6
    if not (scored[0] > clearly_above or (scored[len(scored) // 2] > clearly_above and rises_with_compression)):
        return []
    return [
        f"The compressed models scored above the original ({len(scored) - sum(m <= baseline.metric for m in scored)} "
        f"of {len(scored)} trials, median {scored[len(scored) // 2]:.4g} vs {baseline.metric:.4g}). tightfit reads "
        "`evaluate` as higher is better: if yours is an error or a loss (MSE, MAE), return its negative, e.g. "
        "evaluate=lambda m: -mse(m), and give the limit as MaxDrop(d) (the error may rise by at most d) or "
        "MinMetric(-e) (the error at most e)."
    ]


def _spearman(pairs: Sequence[tuple[float, float]]) -> float:
    from scipy.stats import spearmanr

    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if len(set(xs)) < 2 or len(set(ys)) < 2:  # a constant side: no trend (scipy would warn and answer nan)
        return 0.0
    rho = spearmanr(xs, ys).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def _partly_refused(space: SearchSpace) -> list[str]:
    """Notes on layers an operator refused that other operators of the strategy still compress
    (``left_alone`` lists only layers that nothing touches)."""
    notes = []
    for operator in space.strategy:
        by_reason: dict[str, list[str]] = {}
        for name, reason in operator.refused().items():
            if name in space.fixed:
                by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(shown_name(n) for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            notes.append(f"{operator.name} left {len(names)} layer(s) to the other operators: {shown} ({reason}).")
    return notes


def _followers(space: SearchSpace) -> dict[str, tuple[str, list[str]]]:
    """Modules an operator compresses through other layers' entries in the space (structured
    pruning: a group's members other than its leader) -> (operator name, those layers)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for operator in space.strategy:
        for name, leaders in operator.follows().items():
            searched = [lead for lead in leaders if operator.name in space.fixed.get(lead, {})]
            if searched and name not in found:
                found[name] = (operator.name, searched)
    return found


def _left_alone(analysis, space: SearchSpace) -> list[SkippedModule]:
    """Modules with parameters that no operator of the strategy touches, and why."""
    reasons: dict[str, str] = {}
    for operator in space.strategy:
        for name, reason in operator.refused().items():
            reasons.setdefault(name, reason)
    untouched = [
        SkippedModule(layer.name, layer.type, layer.params, reasons.get(layer.name) or _why_untouched(layer, space.strategy))
        for layer in analysis.layers
        if layer.name not in space.fixed
    ]
    touched = {name for operator in space.strategy for name in operator.touches()} | set(_followers(space))
    # matched on module paths first, then named for a person (a model that is one layer: "<root>")
    return [dataclasses.replace(s, name=shown_name(s.name)) for s in analysis.skipped + tuple(untouched) if s.name not in touched]


def _why_untouched(layer, strategy: Compose) -> str:
    """Why no operator takes a layer that none refused (:func:`~tightfit.operators.compose.why_not_taken`)."""
    return f"no operator of the strategy applies to it ({why_not_taken(layer, strategy)})"


def _following_note(analysis, space: SearchSpace) -> list[str]:
    """A note on the weight layers compressed only with a group another layer leads (they have no
    plan entry of their own, so the plan alone would not show it)."""
    followers = _followers(space)
    by_operator: dict[str, list[str]] = {}
    for layer in analysis.layers:
        if layer.name in followers and layer.name not in space.fixed:
            operator, leaders = followers[layer.name]
            by_operator.setdefault(operator, []).append(f"{layer.name} follows {leaders[0]}")
    return [
        f"{operator} compresses {len(items)} layer(s) with the channel group another layer leads (no setting of "
        f"their own): {', '.join(items[:6])}" + (f" and {len(items) - 6} more" if len(items) > 6 else "") + "."
        for operator, items in by_operator.items()
    ]


@contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna logs every trial at INFO; tightfit shows its own progress instead."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _open_study(
    run: RunDir | None, storage, study_name: str, settings: dict[str, Any], multi: bool = False
) -> tuple[optuna.Study, str | None]:
    """The study (created if new) and its storage URL. Database storages get heartbeats on running
    trials (tightfit.scale), so workers that die are noticed and their trials retried."""
    from .scale.storage import open_storage, redact

    if isinstance(storage, BaseStorage):
        backend, url = storage, getattr(storage, "url", None)
    else:
        url = storage or (run.storage_url if run is not None else None)
        backend = open_storage(url) if url is not None else None
    try:
        directions = ["minimize", "maximize"] if multi else ["minimize"]
        study = optuna.create_study(storage=backend, study_name=study_name, directions=directions, load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        study = optuna.load_study(storage=backend, study_name=study_name)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        diff = sorted(k for k in settings if stored.get(k) != settings[k])
        raise ConfigError(
            f"The study {study_name!r} at {redact(url or 'memory')} was started with different settings "
            f"({', '.join(diff)} differ). Resume with the same arguments, or use a new run_dir / study_name."
        )
    return study, url


def _baseline(study, original, evaluate, layer_names, flops: int | None, latency=None) -> Measurement:
    stored = study.user_attrs.get(BASELINE_ATTR)
    if stored is not None:
        return Measurement.from_dict(stored)
    baseline = _measure_baseline(original, evaluate, layer_names, flops, latency)
    study.set_user_attr(BASELINE_ATTR, baseline.to_dict())
    return baseline


def _final_pick(study, space, trials, observed_only: bool) -> tuple[TrialRecord | None, str | None]:
    """The trial ``compress`` returns: the smallest-objective feasible trial that the constraint
    model of all trials also expects to be feasible (``search/pick.py``: robust to a lucky
    measurement), or with ``observed_only`` (Pareto runs, ``pick="observed"``) the best observed
    feasible trial."""
    observed = best_feasible(trials)
    if observed_only or observed is None:
        return observed, None
    from .search.pick import pick_note, posterior_pick

    pick = posterior_pick(study, space)
    by_number = {t.number: t for t in trials}
    chosen = by_number.get(pick.number)
    if chosen is None or not chosen.feasible or chosen.measurement is None or chosen.fidelity in ("screen", "stopped"):
        return observed, None
    return chosen, pick_note(pick, trials)


def _finish(
    original, evaluate, trials, baseline, objective, best_holder, run, finetune, strategy, seed, layer_names,
    confirmed=False, best: TrialRecord | None = None,
) -> Result:
    best = best if best is not None else best_feasible(trials)
    notes: list[str] = []
    common = dict(
        baseline_metric=baseline.metric,
        baseline_size_bytes=baseline.size_bytes,
        objective=objective,
        trials=trials,
        pareto=pareto_front(trials),
        run_dir=str(run.path) if run is not None else None,
        baseline=baseline,
    )
    if best is None:
        n_ok = sum(t.state == "COMPLETE" for t in trials)
        errors = [t.error for t in trials if t.state == "FAIL" and t.error]
        if n_ok == 0 and errors:  # nothing was measured: the cause is the error, not the constraint
            message = (f"No feasible plan in {len(trials)} trials: every trial failed, so the original model is returned "
                       f"unchanged (each trial's error is in result.trials and trials.csv). The first: {errors[0]}")
        else:
            message = (
                f"No feasible plan in {len(trials)} trials ({n_ok} completed): every compressed model broke the "
                "constraint. The original model is returned unchanged. Loosen the constraint, raise the budget, "
                "narrow the operators' ranges, or fine-tune longer."
            )
        result = Result(
            model=copy.deepcopy(original),
            plan=None,
            metric=baseline.metric,
            size_bytes=baseline.size_bytes,
            nonzero_ratio=baseline.weight_params / max(1, baseline.nonzeros),
            feasible=False,
            best_trial=None,
            message=message,
            **common,
        )
        result.artifact = None
        return result

    data = _best_artifact(best, best_holder, run)
    if data is None:
        # The best trial's file is not at hand (e.g. it ran in another process): replay it.
        candidate = apply_plan_inplace(best.plan, copy.deepcopy(original), strategy)
        if finetune is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                finetune(candidate)
            candidate.eval()  # as in the trial
        data = to_bytes(candidate, best.plan, {"trial": best.number})
        notes.append(f"The model of trial {best.number} was rebuilt from its plan with the same seed.")
    loaded = _load_bytes(data)
    metric = evaluate_metric(evaluate, loaded)
    if confirmed:
        notes.append(
            f"Trial {best.number} was chosen on a validation subsample (estimate {best.measurement.metric:.4f}); "
            f"confirmed on the full validation set: {metric:.4f}."
        )
    elif metric != best.measurement.metric:
        notes.append(
            f"Re-evaluating the saved model gave {metric!r}, not the {best.measurement.metric!r} measured in trial "
            f"{best.number}; the re-measured value is reported."
        )
    nonzeros, _ = count_nonzeros(loaded, layer_names)
    result = Result(
        model=loaded,
        plan=best.plan,
        metric=metric,
        size_bytes=len(data),
        nonzero_ratio=baseline.weight_params / max(1, nonzeros),
        feasible=True,
        best_trial=best,
        message=(
            f"Trial {best.number}: {baseline.size_bytes / len(data):.1f}x smaller file "
            f"({len(data):,} of {baseline.size_bytes:,} bytes), "
            + (f"{baseline.weight_params / nonzeros:.1f}x fewer nonzero weights" if nonzeros else "no nonzero weight left")
            + f", metric {metric:.4f} vs {baseline.metric:.4f} originally."
            + _speed_note(best.measurement, baseline)
        ),
        notes=notes,
        **common,
    )
    result.artifact = data
    if run is not None:
        run.write_model(data)
    return result


def _speed_note(measured: Measurement, baseline: Measurement) -> str:
    if measured.latency_ms is None or baseline.latency_ms is None:
        return ""
    speedup = baseline.latency_ms / measured.latency_ms
    pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    return f" Measured {pace} ({measured.latency_ms:.3g} vs {baseline.latency_ms:.3g} ms per forward pass)."


def _best_artifact(best: TrialRecord, holder: dict[str, Any], run: RunDir | None) -> bytes | None:
    if holder["record"] is not None and holder["record"].number == best.number and holder["bytes"] is not None:
        return holder["bytes"]
    if run is not None:
        return run.read_best(best.number)
    return None


def _load_bytes(data: bytes) -> nn.Module:
    return load_model(io.BytesIO(data))


__all__ = ["compress", "best_feasible", "pareto_front", "float32_file_bytes", "OBJECTIVES", "EXAMPLE_INPUT_FILE", "Sequential"]
