"""One compression run as an object with small stages: :meth:`Run.prepare` (copy, fold, analyze,
space), :meth:`Run.open` (run directory, storage, baseline), :meth:`Run.search` (the ask/tell
loop) and :meth:`Run.finish` (pick, bytes, re-measure, files). :meth:`Run.compress` runs them
all (``tightfit.compress``); :meth:`Run.work` runs the trials only (a worker)."""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import optuna
from torch import nn

from .. import report
from ..errors import ConfigError, ModelError
from ..evaluation.constraints import MaxFlops, check_max_drop
from ..evaluation.metrics import bind_reference
from ..evaluation.sequential import SequentialSession
from ..measure.analysis import ModelAnalysis, analyze, zeroed_note
from ..operators.plan import fold_weight_norm
from ..records import Measurement, Result, TrialAttrs, TrialRecord, best_feasible, pareto_front
from ..recovery import recovery_notes
from ..run_dir import RunDir
from ..search.loop import counted_trials, recover_interrupted, run_trials, trial_record
from ..search.pick import capped_candidates
from ..search.space import SearchSpace, build_space
from .evaluator import BestSoFar, FullEvaluator, TrialEvaluator, TrialSetup, search_context, with_probe_cost
from .finish import Finish, accounting, final_pick, time_breakdown
from .measuring import ForwardPasses, OriginalValues, StaticMeasure, original_flops
from .notes import (
    COMPILED_NOTE,
    direction_note,
    following_note,
    left_alone,
    note_certificate,
    partly_refused,
    weight_norm_note,
)
from .recover import AfterSearch, Recovered, recovery_note
from .sequential import SequentialEvaluator, Verified, verified_note, verify_capped
from .settings import Checked, Settings, check, describe_calibration, tuned_hyperparameters
from .study import open_study, optuna_quiet, stored_baseline

log = logging.getLogger("tightfit")


@dataclass
class Prepared:
    """The run's model side, before any study: the copy it compresses, the search space over it."""

    original: nn.Module
    weight_normed: list[str]
    analysis: ModelAnalysis
    space: SearchSpace
    layer_names: list[str]
    given_input: Any  #: the example input as given (kept for ``tightfit export``)
    example_input: Any  #: the same, or None when FLOPs cannot be counted on it
    flops: int | None
    recorded: dict[str, Any]  #: the settings stored on the study and checked on resume
    evaluate: Any  #: the user's metric, bound to the original (Agreement / Fidelity)
    session: SequentialSession | None
    counter: ForwardPasses


@dataclass
class Opened:
    """The run's storage side: its directory, study, baseline and best trial so far."""

    run: RunDir | None
    study: optuna.Study
    url: str | None
    baseline: Measurement
    baseline_passes: int | None
    best: BestSoFar
    original: OriginalValues  # its per-sample values, for full evaluation's paired standard errors


class Run:
    """One run of ``compress`` (or of a worker) from checked, frozen :class:`Settings`."""

    def __init__(self, model: nn.Module, settings: Settings, *, worker: bool = False) -> None:
        self.settings = settings
        self.worker = worker
        self.checked: Checked = check(model, settings)  # every argument, before any work

    # --- entry points -------------------------------------------------------------------------

    def compress(self) -> Result:
        """The whole run: the result ``tightfit.compress`` returns."""
        run_started = time.perf_counter()
        prepared = self.prepare()
        with ExitStack() as stack:
            opened = self.open(prepared, stack)
            started = self.search(prepared, opened, stack)
            return self.finish(prepared, opened, started, run_started)

    def work(self) -> int:
        """A worker's run: trials of the shared study only; returns how many this process evaluated."""
        prepared = self.prepare()
        with ExitStack() as stack:
            opened = self.open(prepared, stack)
            evaluator, context = self.evaluator(prepared, opened)
            s = self.settings
            return run_trials(
                opened.study, prepared.space, evaluator, budget=s.budget, method=s.search, seed=s.seed, context=context
            )

    # --- stages -------------------------------------------------------------------------------

    def prepare(self) -> Prepared:
        """Copy the model (the user's is never changed), fold weight norm, let model-level operators
        learn its structure, analyze it and build the search space."""
        c, s = self.checked, self.settings
        original = copy_model(c.model)
        weight_normed = fold_weight_norm(original)
        for op in c.strategy:  # model-level operators (structured pruning) learn the model's structure
            op.prepare(original, s.example_input)
        analysis = analyze(original)
        space = build_space(
            c.strategy, analysis, tuned_hyperparameters(s.finetune)
        )  # ModelError if nothing compressible
        layer_names = [layer.name for layer in analysis.layers if layer.name in space.fixed]
        counted = any(isinstance(con, MaxFlops) for con in c.constraints)  # then FLOPs must count, as for the objective
        flops = original_flops(original, s.example_input, layer_names, "flops" if counted else c.objective)
        recorded = {
            "space": space.keys,
            "objective": [c.objective, "metric"] if c.multi else c.objective,
            "constraints": [con.describe() for con in c.constraints],
            **(
                {"constraints_after_recovery": [con.describe() for con in c.final_constraints]}
                if c.final_constraints
                else {}
            ),
            "search": s.search,
            "seed": s.seed,
        }
        if c.latency is not None:
            recorded["latency"] = c.latency.describe()
        if c.probe_inputs is not None:  # a resume with other calibration data would mix plans fitted on both
            recorded["calibration"] = describe_calibration(c.probe_inputs)
        evaluate = bind_reference(s.evaluate, original)  # Agreement / Fidelity compare with the original
        session = None
        if s.evaluation is not None:
            recorded["evaluation"] = s.evaluation.describe()
            session = SequentialSession(s.evaluation, evaluate, c.constraints, s.seed)
        return Prepared(
            original,
            weight_normed,
            analysis,
            space,
            layer_names,
            s.example_input,
            s.example_input if flops is not None else None,
            flops,
            recorded,
            evaluate,
            session,
            ForwardPasses(evaluate),
        )

    def open(self, p: Prepared, stack: ExitStack) -> Opened:
        """Open the run directory (locked while the run lasts), the study and its storage, and
        measure the original once (stored on the study; read back on resume)."""
        s, c = self.settings, self.checked
        stack.enter_context(optuna_quiet())
        if self.worker and s.storage is None:
            raise ConfigError("A worker needs `storage`: the URL of the study it joins (e.g. postgresql://…).")
        run = stack.enter_context(RunDir.open(s.run_dir)) if s.run_dir is not None and not self.worker else None
        study, url = open_study(run, s.storage, s.study_name, p.recorded, c.multi)
        if run is not None and url == run.storage_url:
            # We hold the run directory's lock and our workers die with us, so RUNNING trials in the
            # run directory's own SQLite belong to a dead process. Shared storages use heartbeats.
            recovered = recover_interrupted(study)
            if recovered:
                log.warning("resuming: %d interrupted trial(s) will be evaluated again", recovered)
        if run is not None and p.given_input is not None:
            run.write_example_input(p.given_input)  # `tightfit export` checks outputs on it (a compact copy)
        if p.session is not None:
            full_metric = p.session.baseline(p.original)  # per-sample values, computed once and kept
            baseline = stored_baseline(study, p.original, lambda _model: full_metric, p.layer_names, p.flops, c.latency)
            original = OriginalValues(None)
        else:
            original, metric = OriginalValues.read(p.evaluate, p.original, c.constraints)
            evaluate = p.evaluate if metric is None else (lambda _model: metric)
            baseline = stored_baseline(study, p.original, evaluate, p.layer_names, p.flops, c.latency)
        baseline_passes = p.counter.take()
        check_max_drop(c.constraints, p.evaluate, baseline.metric)  # warns of a drop no plan could break
        best = BestSoFar(best_feasible([trial_record(t) for t in study.get_trials()]), run, keep=not self.worker)
        return Opened(run, study, url, baseline, baseline_passes, best, original)

    def trial_setup(self, p: Prepared, o: Opened) -> TrialSetup:
        """How a plan becomes a measured candidate: shared by the evaluators and the verification."""
        s, c = self.settings, self.checked
        return TrialSetup(
            original=p.original,
            strategy=c.strategy,
            space=p.space,
            finetune=s.finetune,
            seed=s.seed,
            objective=c.objective,
            constraints=c.constraints,
            baseline=o.baseline,
            static=StaticMeasure(s.artifact_extra, p.layer_names, p.example_input, o.baseline),
            counter=p.counter,
            best=o.best,
            latency=c.latency,
            calibration=c.calibration,
        )

    def evaluator(self, p: Prepared, o: Opened) -> tuple[TrialEvaluator, Any]:
        """The trial evaluator (full, or sequential with ``evaluation=Sequential(...)``) and the
        samplers' context, each trial charged with its probes' cost."""
        s, c = self.settings, self.checked
        setup = self.trial_setup(p, o)
        if p.session is not None:
            evaluator: TrialEvaluator = SequentialEvaluator(setup, p.session)
        else:
            evaluator = FullEvaluator(setup, p.evaluate, c.multi, o.original)
        context = search_context(
            # cheap evaluation: probes are sequential too, and never read the held-out samples
            setup,
            p.session.estimate if p.session is not None else p.evaluate,
            s.budget,
            p.layer_names,
            p.example_input,
            n_objectives=2 if c.multi else 1,
            probe_inputs=c.probe_inputs,
        )
        context, evaluator = with_probe_cost(context, evaluator, p.counter)
        return evaluator, context

    def search(self, p: Prepared, o: Opened, stack: ExitStack) -> float:
        """The ask/tell loop until the budget is used (waiting for other workers' trials), with
        live progress and run files; returns when it started (``time.perf_counter``)."""
        s = self.settings
        evaluator, context = self.evaluator(p, o)
        if s.on_start is not None:
            s.on_start(o.url, s.study_name)
        reporter = stack.enter_context(report.live_progress(s.budget, o.baseline, enabled=s.progress))
        reporter.advance_to(len(counted_trials(o.study)))
        reporter.add_cost(o.study.get_trials(deepcopy=False))
        started = time.perf_counter()
        refresher = report.LiveFiles(o.run.path, o.baseline, p.recorded) if o.run is not None else None

        def on_trial(frozen: optuna.trial.FrozenTrial) -> None:
            reporter.on_trial(frozen)
            if refresher is not None or s.progress:
                trials_now = o.study.get_trials(deepcopy=False)
                reporter.advance_to(len(counted_trials(o.study)))  # other workers' trials too
                if refresher is not None:
                    refresher.maybe_write([trial_record(t) for t in trials_now])

        run_trials(
            o.study,
            p.space,
            evaluator,
            budget=s.budget,
            method=s.search,
            seed=s.seed,
            on_trial=on_trial,
            drain=True,
            context=context,
        )
        return started

    def verify(self, p: Prepared, o: Opened, trials: list[TrialRecord], best: TrialRecord | None) -> Verified | None:
        """Cheap evaluation with capped trials: the credible ones read to the end of the search set
        until one smaller than ``best`` is accepted (``Sequential.trial_samples``,
        ``verify_capped``); None when there is nothing to read."""
        if p.session is None:
            return None
        capped = [t.number for t in trials if t.fidelity == "capped" and t.plan is not None]
        candidates = capped_candidates(o.study, p.space, capped)
        if not candidates:
            return None
        return verify_capped(self.trial_setup(p, o), p.session, o.study, trials, candidates, best)

    def recover_after_search(
        self, p: Prepared, o: Opened, trials: list[TrialRecord], best: TrialRecord | None
    ) -> tuple[TrialRecord | None, Recovered | None]:
        """With ``recover=``: the chosen plan (and the next best, up to ``recover_top``) recovered
        once and re-measured; the best of them after recovery, if any still meets the constraints."""
        s, c = self.settings, self.checked
        if s.recover is None or best is None:
            return best, None
        after = AfterSearch(
            p.original,
            c.strategy,
            c.calibration,
            s.recover,
            s.seed,
            # cheap evaluation: the full validation set, so an answer reported feasible meets `constraint`
            # there (a point estimate on the search set let one through that did not)
            p.session.validation if p.session is not None else p.evaluate,
            StaticMeasure(s.artifact_extra, p.layer_names, p.example_input, o.baseline),
            c.answer_constraints,
            o.baseline,
            c.objective,
            c.latency,
        )
        if p.session is not None:  # the certificate is of `constraint`, not of a looser search_constraint
            p.session.judge(c.answer_constraints)
        recovered = after.run(trials, s.recover_top, best)
        if recovered.chosen is not None or c.final_constraints is None:
            return (recovered.chosen or best), recovered
        # held to a looser search_constraint: the searched answer may not meet `constraint`; the best that did
        recovered.loosened, recovered.fallback = True, after.fallback(trials, s.recover_top, p.session is not None)
        return recovered.fallback, recovered

    def finish(self, p: Prepared, o: Opened, started: float, run_started: float | None = None) -> Result:
        """Pick the answer, get its bytes, re-measure the saved model, add the notes, write the files
        (``started``: when the search began; ``run_started``: when the run did, for the time breakdown)."""
        s, c = self.settings, self.checked
        finish_started = time.perf_counter()
        trials = [trial_record(t) for t in o.study.get_trials()]
        # objective="metric": the feasible trial with the best metric as measured (its constraints are resources)
        observed = c.multi or s.pick == "observed" or c.objective == "metric"
        best_trial, pick_note = final_pick(o.study, p.space, trials, observed)
        finetune = s.finetune
        if p.space.recovery and best_trial is not None:  # a replayed best trial trains with its own settings
            frozen = {t.number: t for t in o.study.get_trials(deepcopy=False)}[best_trial.number]
            tuned = TrialAttrs.from_trial(frozen).recovery
            finetune = finetune.with_settings(**(tuned or {}))
        p.counter.take()
        verified = self.verify(p, o, trials, best_trial) if not observed else None
        if verified is not None and verified.chosen is not None:
            chosen = verified.chosen
            trials = [chosen if t.number == chosen.number else t for t in trials]
            best_trial, pick_note = chosen, None
            o.best.offer(chosen, verified.data or b"")
        best_trial, recovered = self.recover_after_search(p, o, trials, best_trial)
        result = Finish(
            p.original,
            p.session.confirm if p.session is not None else p.evaluate,
            o.baseline,
            c.objective,
            o.best,
            o.run,
            finetune,
            c.strategy,
            s.seed,
            p.layer_names,
            # a recovered (or re-checked fallback) answer was measured on the full validation set already
            confirmed=p.session is not None and (recovered is None or recovered.answer is None),
            calibration=c.calibration,
            recovered=recovered.data if recovered is not None and recovered.chosen is not None else None,
            # with search_constraint, no answer after the recovery is none (not the search's best)
            pick_if_none=c.final_constraints is None,
        ).result(trials, best_trial)
        if pick_note and result.feasible:
            result.notes.insert(0, pick_note)
        if recovered is not None:
            note_recovery(result, recovered, s.recover_top)
        if p.session is not None and result.feasible:
            result.certificate = p.session.certify(result.model)
            note_certificate(result, c.answer_constraints, o.baseline)
            if recovered is not None:
                result.notes.append(RECHECKED_NOTE)
        result.accounting = accounting(trials, o.baseline_passes, p.counter.take(), time.perf_counter() - started)
        if verified is not None:
            result.accounting["verified"] = verified.read
            note = verified_note(verified)
            if note is not None:
                result.notes.append(note)
        if c.multi:  # the front the user asked for: feasible plans only
            result.pareto = pareto_front([t for t in trials if t.feasible])
        result.left_alone = left_alone(p.analysis, p.space)
        result.notes.extend(
            partly_refused(p.space)
            + following_note(p.analysis, p.space)
            + (direction_note(p.evaluate, trials, o.baseline) if c.objective != "metric" else [])
        )
        result.notes.extend(recovery_notes(s.finetune))  # e.g. an empty training loader trained nothing
        result.notes.extend(
            zeroed_note(result.model, p.layer_names) if result.feasible else []
        )  # a layer pruned to nothing
        if p.weight_normed:
            result.notes.append(weight_norm_note(p.weight_normed))
        if c.compiled:
            result.notes.append(COMPILED_NOTE)
        # up to here: writing the run files (the summary holds the breakdown) is left out of it
        result.accounting["time"] = self.times(trials, run_started, started, finish_started)
        if o.run is not None:
            report.write_run_files(result, o.run.path, p.recorded)
        return result

    @staticmethod
    def times(
        trials: list[TrialRecord], run_started: float | None, started: float, finish_started: float
    ) -> dict[str, float]:
        """The run's time breakdown (``finish.time_breakdown``); without ``run_started`` (a caller
        of ``finish`` alone) the run is counted from the search's start."""
        now = time.perf_counter()
        run_started = started if run_started is None else run_started
        return time_breakdown(trials, now - run_started, started - run_started, now - finish_started)


#: the recovered plans were re-checked on the full validation set (AfterSearch, session.validation)
RECHECKED_NOTE = (
    "The recovered plans were re-checked on the full validation set, the certificate's held-out samples included: "
    "the answer meets the constraints there, and the certificate, whose samples took part in accepting it, may be "
    "optimistic."
)


def note_recovery(result: Result, recovered: Recovered, k: int) -> None:
    """The recovery after the search on the result: the metric before and after, and a note."""
    result.recovery = recovered.to_dict()
    result.notes.insert(0, recovery_note(recovered, k))
    if recovered.chosen is not None and result.best_trial is not None:
        result.metric_before_recovery = recovered.before[result.best_trial.number]
        result.message += f" Before the recovery after the search: {result.metric_before_recovery:.4f}."


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode: tightfit compresses copies and never changes the user's model."""
    try:
        return copy.deepcopy(model).eval()
    except Exception as exc:
        hint = (
            "it uses the old torch.nn.utils.weight_norm: switch to torch.nn.utils.parametrizations.weight_norm "
            "(tightfit folds it into the weight) or call torch.nn.utils.remove_weight_norm first"
            if "weight_norm" in str(exc)
            else "e.g. keep open files or locks out of its attributes"
        )
        raise ModelError(
            f"The model cannot be copied ({type(exc).__name__}: {exc}); tightfit compresses copies and never "
            f"changes your model. Make it deep-copyable ({hint})."
        ) from exc
