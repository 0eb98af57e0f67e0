"""Live progress of a search on the terminal (Rich)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import optuna

from ..records import Measurement


class _Progress:
    def __init__(self, budget: int, baseline: Measurement, bar) -> None:
        self.budget = budget
        self.baseline = baseline
        self.bar = bar
        self.task = bar.add_task("search", total=budget, best="-") if bar is not None else None
        self.best_size: int | None = None
        self.failed = 0

    def advance_to(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def on_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            self.failed += 1
        measured = trial.user_attrs.get("measurement")
        feasible = all(c <= 0 for c in trial.constraints.values())
        if measured and feasible and trial.state == optuna.trial.TrialState.COMPLETE:
            if self.best_size is None or measured["size_bytes"] < self.best_size:
                self.best_size = measured["size_bytes"]
        if self.bar is None:
            return
        best = "-"
        if self.best_size is not None:
            best = f"{self.baseline.size_bytes / self.best_size:.1f}x ({self.best_size:,} B)"
        failed = f"  failed: {self.failed}" if self.failed else ""
        self.bar.update(self.task, advance=1 if trial.user_attrs.get("interrupted") is None else 0, best=best + failed)


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
    )
    with Progress(*columns, transient=False) as bar:
        yield _Progress(budget, baseline, bar)
