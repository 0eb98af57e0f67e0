"""The run directory's human-readable files: summary.json, trials.csv and trials.png."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._io import write_atomic, write_text_atomic
from ..records import Measurement, Result, TrialRecord
from ..run_dir import PLOT_FILE, SUMMARY_FILE, TRIALS_FILE

TRIAL_COLUMNS = [
    "number",
    "state",
    "feasible",
    "objective",
    "metric",
    "size_bytes",
    "nonzeros",
    "nonzero_ratio",
    "flops",
    "flops_reduction",
    "latency_ms",
    "latency_iqr_ms",
    "speedup",
    "constraints",
    "duration_s",
    "val_samples",
    "finetune_steps",
    "metric_se",
    "fidelity",
    "error",
    "plan",
]


def _ratio(base: float | None, value: float | None) -> float | None:
    return round(base / value, 4) if base and value else None


def trial_row(t: TrialRecord, baseline: Measurement | None = None) -> dict[str, Any]:
    """One row of trials.csv. With the baseline: FLOPs reduction (baseline FLOPs / trial FLOPs)
    next to the measured speedup (baseline latency / trial latency)."""
    m = t.measurement
    b = baseline
    return {
        "number": t.number,
        "state": t.state,
        "feasible": t.feasible,
        "objective": t.objective,
        "metric": m.metric if m else None,
        "size_bytes": m.size_bytes if m else None,
        "nonzeros": m.nonzeros if m else None,
        "nonzero_ratio": round(m.nonzero_ratio, 4) if m else None,
        "flops": m.flops if m else None,
        "flops_reduction": _ratio(b.flops, m.flops) if m and b else None,
        "latency_ms": round(m.latency_ms, 5) if m and m.latency_ms is not None else None,
        "latency_iqr_ms": round(m.latency_iqr_ms, 5) if m and m.latency_iqr_ms is not None else None,
        "speedup": _ratio(b.latency_ms, m.latency_ms) if m and b else None,
        "constraints": json.dumps(list(t.constraints)),
        "duration_s": round(t.duration_s, 4) if t.duration_s is not None else None,
        "val_samples": t.val_samples,
        "finetune_steps": t.finetune_steps,
        "metric_se": t.metric_se,
        "fidelity": t.fidelity,
        "error": t.error,
        "plan": t.plan.to_json() if t.plan else None,
    }


def trials_csv(trials: list[TrialRecord], baseline: Measurement | None = None) -> str:
    """The text of trials.csv."""
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=TRIAL_COLUMNS)
    writer.writeheader()
    for t in trials:
        writer.writerow(trial_row(t, baseline))
    return handle.getvalue()


def write_trials_csv(trials: list[TrialRecord], path: Path, baseline: Measurement | None = None) -> None:
    write_text_atomic(path, trials_csv(trials, baseline))


def summary_dict(result: Result, settings: dict[str, Any]) -> dict[str, Any]:
    best = result.best_trial
    return {
        "feasible": result.feasible,
        "message": result.message,
        "objective": result.objective,
        "settings": settings,
        "metric": result.metric,
        "metric_before_recovery": result.metric_before_recovery,
        "recovery": result.recovery,
        "baseline_metric": result.baseline_metric,
        "size_bytes": result.size_bytes,
        "baseline_size_bytes": result.baseline_size_bytes,
        # the file's bits per weight of the compressible layers (what MaxBits bounds)
        "bits_per_weight": (
            result.size_bytes * 8 / max(1, result.baseline.weight_params) if result.baseline is not None else None
        ),
        "compression_ratio": result.compression_ratio,
        "nonzero_ratio": result.nonzero_ratio,
        "baseline": result.baseline.to_dict() if result.baseline else None,
        "best_trial": best.number if best else None,
        "plan": result.plan.to_dict() if result.plan else None,
        "trials": {
            "total": len(result.trials),
            "complete": sum(t.state == "COMPLETE" for t in result.trials),
            "feasible": sum(t.feasible for t in result.trials),
            "failed": sum(t.state == "FAIL" for t in result.trials),
            "screened": sum(t.fidelity == "screen" or t.state == "PRUNED" for t in result.trials),
            "stopped": sum(t.fidelity == "stopped" for t in result.trials),
            "capped": sum(t.fidelity == "capped" for t in result.trials),
        },
        "pareto": [t.number for t in result.pareto],
        "left_alone": [
            {"name": m.name, "type": m.type, "params": m.params, "reason": m.reason} for m in result.left_alone
        ],
        "notes": result.notes,
        "accounting": result.accounting,
        "certificate": result.certificate.to_dict() if result.certificate is not None else None,
        "units": {
            "size_bytes": "bytes of model.tfz (compressed) / of torch.save(state_dict) (baseline)",
            "bits_per_weight": "size_bytes x 8 / weights of the compressible layers",
            "nonzero_ratio": "compressible-layer weights / nonzero weights",
            "flops": "per forward pass of example_input, nonzero weights only",
            "latency_ms": "median wall time of one forward pass of the saved model (torch.utils.benchmark)",
            "speedup": "baseline latency / trial latency, measured (trials.csv)",
            "accounting.time": "seconds of wall time of this process's run, by where they went (finish.time_breakdown)",
            "accounting.verified": "capped trials read to the end of the search set after the search: verdict, "
            "validation samples read, seconds (Sequential.trial_samples)",
        },
    }


def write_summary(result: Result, path: Path, settings: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(summary_dict(result, settings), indent=2))


class PlotSource(Protocol):
    """What :func:`plot_figure` reads: a :class:`~tightfit.records.Result`, or a running search's snapshot."""

    @property
    def trials(self) -> list[TrialRecord]: ...
    @property
    def pareto(self) -> list[TrialRecord]: ...
    @property
    def best_trial(self) -> TrialRecord | None: ...
    @property
    def baseline_metric(self) -> float: ...


def plot_trials(result: PlotSource, path: Path) -> None:
    """Draw :func:`plot_figure` into ``path`` (PNG), atomically."""
    buffer = io.BytesIO()
    plot_figure(result, buffer)
    write_atomic(path, buffer.getvalue())


def plot_figure(result: PlotSource, target: Any) -> None:
    """Metric vs file size of every completed trial; feasible vs not; the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    done = [t for t in result.trials if t.measurement is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for feasible, color, label in ((True, "tab:green", "feasible"), (False, "tab:red", "infeasible")):
        pts = [t.measurement for t in done if t.feasible == feasible and t.measurement is not None]
        if pts:
            ax.scatter(
                [m.size_bytes for m in pts],
                [m.metric for m in pts],
                c=color,
                s=22,
                alpha=0.75,
                label=label,
            )
    front = [t.measurement for t in result.pareto if t.measurement is not None]
    if front:
        ax.plot(
            [m.size_bytes for m in front],
            [m.metric for m in front],
            "k--",
            lw=1,
            label="Pareto front",
        )
    chosen = result.best_trial.measurement if result.best_trial is not None else None
    if chosen is not None:  # the chosen trial is a measured one
        ax.scatter(
            [chosen.size_bytes], [chosen.metric], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="chosen"
        )
    ax.axhline(result.baseline_metric, color="gray", lw=0.8, label="original metric")
    ax.set_xscale("log")
    ax.set_xlabel("saved model size (bytes, log scale)")
    ax.set_ylabel("metric")
    ax.set_title(f"{len(done)} evaluated trials")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)


def write_run_files(result: Result, run_dir: Path, settings: dict[str, Any]) -> None:
    write_trials_csv(result.trials, run_dir / TRIALS_FILE, result.baseline)
    write_summary(result, run_dir / SUMMARY_FILE, settings)
    plot_trials(result, run_dir / PLOT_FILE)


@dataclass
class _Snapshot:
    """What :func:`plot_trials` reads of a Result, for a run still in progress."""

    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best_trial: TrialRecord | None
    baseline_metric: float


class LiveFiles:
    """Keeps trials.csv and trials.png of a running search current: the CSV after every trial,
    the plot at most every ``plot_every_s`` seconds (drawing costs ~0.1 s). Files are replaced
    atomically, so a reader never sees half of one."""

    def __init__(
        self, run_dir: Path, baseline: Measurement, settings: dict[str, Any], plot_every_s: float = 5.0
    ) -> None:
        self.run_dir = Path(run_dir)
        self.baseline = baseline
        self.plot_every_s = plot_every_s
        self._last_plot = float("-inf")

    def maybe_write(self, trials: list[TrialRecord]) -> None:
        from ..records import best_feasible, pareto_front

        write_trials_csv(trials, self.run_dir / TRIALS_FILE, self.baseline)
        now = time.monotonic()
        if now - self._last_plot >= self.plot_every_s:
            self._last_plot = now
            snapshot = _Snapshot(trials, pareto_front(trials), best_feasible(trials), self.baseline.metric)
            plot_trials(snapshot, self.run_dir / PLOT_FILE)
