"""The end of a run: pick the answer among the trials, get its file's bytes (kept, or rebuilt from
its plan with the same seed), re-measure the saved model, and account for the run's cost."""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..evaluation.metrics import evaluate_metric
from ..export.artifact import load_model, to_bytes
from ..measure.analysis import count_nonzeros
from ..operators.compose import Compose
from ..records import NOT_ANSWERS, Measurement, Result, TrialRecord, best_feasible, pareto_front
from ..run_dir import RunDir
from ..search.pick import pick_note, posterior_pick
from .evaluator import BestSoFar, apply_to_copy, recover_seeded
from .notes import speed_note


def final_pick(study, space, trials, observed_only: bool) -> tuple[TrialRecord | None, str | None]:
    """The trial ``compress`` returns: the smallest-objective feasible trial that the constraint
    model of all trials also expects to be feasible (``search/pick.py``: robust to a lucky
    measurement), or with ``observed_only`` (Pareto runs, ``pick="observed"``) the best observed
    feasible trial."""
    observed = best_feasible(trials)
    if observed_only or observed is None:
        return observed, None
    pick = posterior_pick(study, space)
    by_number = {t.number: t for t in trials}
    chosen = by_number.get(pick.number)
    if chosen is None or not chosen.feasible or chosen.measurement is None or chosen.fidelity in NOT_ANSWERS:
        return observed, None
    return chosen, pick_note(pick, trials)


def accounting(trials: Sequence[TrialRecord], baseline_passes, final_passes, wall_s: float) -> dict[str, Any]:
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


def time_breakdown(trials: Sequence[TrialRecord], run_s: float, before_s: float, after_s: float) -> dict[str, float]:
    """How the run's wall time (``run_s``, this process) was spent, in seconds: before the search
    (copy, analysis, the original's measurement), the optimizer's probes and its own suggestion work,
    fine-tuning, the trials' evaluation (apply the plan, metric, file bytes), after the search (pick,
    re-measure, files), and the rest (storage, progress; negative on a resumed run, whose earlier
    processes' trials are counted too). A trial whose evaluator does not time its fine-tuning
    (cheap evaluation) counts it as evaluation."""
    probes = sum(t.probe_s or 0.0 for t in trials)
    suggest = sum(t.search_time_s or 0.0 for t in trials)
    finetune = sum(t.finetune_s or 0.0 for t in trials)
    evaluation = sum(t.duration_s or 0.0 for t in trials) - suggest - finetune
    parts = {
        "before_search_s": before_s,
        "probes_s": probes,
        "optimizer_s": suggest - probes,
        "finetune_s": finetune,
        "evaluation_s": evaluation,
        "after_search_s": after_s,
    }
    return {"total_s": run_s, **parts, "other_s": run_s - sum(parts.values())}


@dataclass
class Finish:
    """What the end of a run needs: the original and how plans were applied and recovered, the
    metric the answer is re-measured with, and where its file is kept."""

    original: nn.Module
    evaluate: Any
    baseline: Measurement
    objective: str
    best: BestSoFar
    run: RunDir | None
    finetune: Any
    strategy: Compose
    seed: int
    layer_names: list[str]
    confirmed: bool = False
    calibration: list[Any] | None = None
    #: the answer's file when it was recovered after the search (it is not the trial's kept file)
    recovered: bytes | None = None
    #: with no ``best`` given, the best feasible trial is the answer (False: nothing is)
    pick_if_none: bool = True

    def result(self, trials: list[TrialRecord], best: TrialRecord | None = None) -> Result:
        if best is None and self.pick_if_none:
            best = best_feasible(trials)
        common = dict(
            baseline_metric=self.baseline.metric,
            baseline_size_bytes=self.baseline.size_bytes,
            objective=self.objective,
            trials=trials,
            pareto=pareto_front(trials),
            run_dir=str(self.run.path) if self.run is not None else None,
            baseline=self.baseline,
        )
        if best is None:
            return self._nothing_feasible(trials, common)
        return self._answer(best, common)

    def _nothing_feasible(self, trials: list[TrialRecord], common: dict[str, Any]) -> Result:
        baseline = self.baseline
        n_ok = sum(t.state == "COMPLETE" for t in trials)
        errors = [t.error for t in trials if t.state == "FAIL" and t.error]
        if n_ok == 0 and errors:  # nothing was measured: the cause is the error, not the constraint
            message = (
                f"No feasible plan in {len(trials)} trials: every trial failed, so the original model is returned "
                f"unchanged (each trial's error is in result.trials and trials.csv). The first: {errors[0]}"
            )
        else:
            message = (
                f"No feasible plan in {len(trials)} trials ({n_ok} completed): every compressed model broke the "
                "constraint. The original model is returned unchanged. Loosen the constraint, raise the budget, "
                "narrow the operators' ranges, or fine-tune longer."
            )
        result = Result(
            model=copy.deepcopy(self.original),
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

    def _bytes_of(self, best: TrialRecord, notes: list[str]) -> bytes:
        data = self.recovered if self.recovered is not None else self.best.bytes_of(best.number)
        if data is None:
            # The best trial's file is not at hand (e.g. it ran in another process): replay it.
            candidate = apply_to_copy(best.plan, self.original, self.strategy, self.calibration)
            if self.finetune is not None:
                recover_seeded(self.finetune, candidate, self.seed)  # as in the trial
            data = to_bytes(candidate, best.plan, {"trial": best.number})
            notes.append(f"The model of trial {best.number} was rebuilt from its plan with the same seed.")
        return data

    def _why_chosen(self, trials: list[TrialRecord]) -> str:
        if self.objective != "metric":
            return ""
        feasible = sum(t.feasible for t in trials)
        return f" (the best metric of {feasible} plan{'s' if feasible != 1 else ''} within the budget)"

    def _answer(self, best: TrialRecord, common: dict[str, Any]) -> Result:
        baseline, notes = self.baseline, []
        data = self._bytes_of(best, notes)
        loaded = load_model(
            io.BytesIO(data), self.original
        )  # into the model compress holds: the file unpickles nothing
        metric = evaluate_metric(self.evaluate, loaded)
        if self.confirmed:
            notes.append(
                f"Trial {best.number} was chosen on a validation subsample (estimate {best.measurement.metric:.4f}); "
                f"confirmed on the full validation set: {metric:.4f}."
            )
        elif metric != best.measurement.metric:
            notes.append(
                f"Re-evaluating the saved model gave {metric!r}, not the {best.measurement.metric!r} measured in trial "
                f"{best.number}; the re-measured value is reported."
            )
        nonzeros, _ = count_nonzeros(loaded, self.layer_names)
        ratio = baseline.weight_params / max(1, nonzeros)
        fewer = f"{ratio:.1f}x fewer nonzero weights" if nonzeros else "no nonzero weight left"
        result = Result(
            model=loaded,
            plan=best.plan,
            metric=metric,
            size_bytes=len(data),
            nonzero_ratio=ratio,
            feasible=True,
            best_trial=best,
            message=(
                f"Trial {best.number}{self._why_chosen(common['trials'])}: "
                f"{baseline.size_bytes / len(data):.1f}x smaller file "
                f"({len(data):,} of {baseline.size_bytes:,} bytes), {fewer}, "
                f"metric {metric:.4f} vs {baseline.metric:.4f} originally." + speed_note(best.measurement, baseline)
            ),
            notes=notes,
            **common,
        )
        result.artifact = data
        if self.run is not None:
            self.run.write_model(data)
        return result
