"""Live progress of a search on the terminal (Rich)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import optuna

from ..records import NOT_ANSWERS, Measurement, TrialAttrs

if TYPE_CHECKING:
    from rich.progress import Progress


class _Progress:
    def __init__(self, budget: int, baseline: Measurement, bar: Progress | None) -> None:
        self.budget = budget
        self.baseline = baseline
        self.bar = bar
        self.task = bar.add_task("search", total=budget, best="-", cost="") if bar is not None else None
        self.best_size: int | None = None
        self.failed = 0
        self.val_samples = 0
        self.finetune_steps = 0
        self.screened = 0

    def add_cost(self, trials: Iterable[optuna.trial.FrozenTrial]) -> None:
        """Count the cost of trials stored before this process started (a resumed run)."""
        for t in trials:
            self._count(t)
        self._refresh()

    def _count(self, trial: optuna.trial.FrozenTrial) -> None:
        attrs = TrialAttrs.from_trial(trial)
        self.val_samples += (attrs.val_samples or 0) + (attrs.probe_samples or 0)
        self.finetune_steps += attrs.finetune_steps or 0
        self.screened += attrs.fidelity == "screen"
        self.stopped = getattr(self, "stopped", 0) + (attrs.fidelity == "stopped")

    def _cost(self) -> str:
        screened = f", {self.screened} screened" if self.screened else ""
        stopped = f", {self.stopped} stopped" if getattr(self, "stopped", 0) else ""
        return f"val fwd: {self.val_samples:,}  ft steps: {self.finetune_steps:,}{screened}{stopped}"

    def _refresh(self) -> None:
        if self.bar is not None and self.task is not None:  # both or neither
            self.bar.update(self.task, cost=self._cost())

    def advance_to(self, done: int) -> None:
        if self.bar is not None and self.task is not None:  # both or neither
            self.bar.update(self.task, completed=done)

    def on_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            self.failed += 1
        self._count(trial)
        attrs = TrialAttrs.from_trial(trial)
        measured = attrs.measurement
        feasible = all(c <= 0 for c in trial.constraints.values())
        screened = attrs.fidelity in NOT_ANSWERS
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        if (
            measured
            and feasible
            and not screened
            and complete
            and (self.best_size is None or measured.size_bytes < self.best_size)
        ):
            self.best_size = measured.size_bytes
        if self.bar is None or self.task is None:  # both or neither
            return
        best = "-"
        if self.best_size is not None:
            best = f"{self.baseline.size_bytes / self.best_size:.1f}x ({self.best_size:,} B)"
        failed = f"  failed: {self.failed}" if self.failed else ""
        self.bar.update(self.task, advance=1 if attrs.interrupted is None else 0, best=best + failed, cost=self._cost())


@contextmanager
def live_progress(budget: int, baseline: Measurement, *, enabled: bool) -> Iterator[_Progress]:
    if not enabled:
        yield _Progress(budget, baseline, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]searching"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("best feasible: {task.fields[best]}"),
        TextColumn("{task.fields[cost]}"),
    )
    with Progress(*columns, transient=False) as bar:
        yield _Progress(budget, baseline, bar)
