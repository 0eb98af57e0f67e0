"""Reading a run back (finished or still running) and showing it as terminal tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..records import Measurement, TrialRecord
from ..run_dir import STUDY_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from rich.console import JustifyMethod
    from rich.table import Table


@dataclass
class RunView:
    trials: list[TrialRecord]
    baseline: Measurement | None
    settings: dict[str, Any]
    summary: dict[str, Any] | None  # None while the run has not finished


def load_run(run_dir: str | Path | None = None, *, storage: str | None = None, study_name: str = "tightfit") -> RunView:
    """Read a run from its directory (or any Optuna storage URL) without taking its lock."""
    import optuna
    import sqlalchemy

    from ..run_dir import BASELINE_ATTR, SETTINGS_ATTR
    from ..search.loop import trial_record

    summary = None
    if storage is None:
        if run_dir is None:
            raise ConfigError("Give a run directory or a storage URL.")
        root = Path(run_dir)
        if not (root / STUDY_FILE).exists():
            raise ConfigError(f"{str(root)!r} is not a tightfit run directory (no {STUDY_FILE}).")
        if (root / STUDY_FILE).stat().st_size == 0:  # Optuna would write a new schema into it
            raise ConfigError(
                f"{str(root / STUDY_FILE)!r} is empty (0 bytes): the run holds no study to show. "
                "Restore it from a backup if the run had trials."
            )
        storage = f"sqlite:///{(root / STUDY_FILE).resolve()}"
        summary = _read_summary(root / SUMMARY_FILE)
    from ..scale.storage import check_sqlite_study, redact, with_installed_driver

    check_sqlite_study(storage)  # a damaged study.db: say so and what to do, not a DatabaseError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        url = with_installed_driver(storage)
        names = optuna.get_all_study_names(url)
        if study_name not in names and run_dir is not None and len(names) == 1:
            study_name = names[0]  # a run directory holds one study, whatever its name
        if study_name not in names:
            known = f" (it holds: {', '.join(names)})" if names else ""
            raise ConfigError(f"No study named {study_name!r} in {redact(storage)}{known}; pass --study NAME.")
        study = optuna.load_study(study_name=study_name, storage=url)
        baseline = study.user_attrs.get(BASELINE_ATTR)
        trials = [trial_record(t) for t in study.get_trials()]
    except ImportError as exc:
        raise ConfigError(f"storage {redact(storage)}: the database driver is missing ({exc}).") from None
    except sqlalchemy.exc.DatabaseError as exc:
        raise ConfigError(
            f"storage {redact(storage)} cannot be read ({str(exc.orig or exc).splitlines()[0]}); "
            "restore the study file from a backup, or check the database server."
        ) from None
    if summary is not None and summary.get("trials", {}).get("total") != len(trials):
        summary = None  # the summary is from an earlier stop; the study has moved on
    return RunView(
        trials=trials,
        baseline=Measurement.from_dict(baseline) if baseline else None,
        settings=study.user_attrs.get(SETTINGS_ATTR, {}),
        summary=summary,
    )


def _read_summary(path: Path) -> dict[str, Any] | None:
    """summary.json, or None if there is none or it cannot be parsed (tightfit writes it atomically,
    but one written by an older version, or copied while it was written, may be cut short)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        import logging

        logging.getLogger("tightfit").warning("%s is unreadable (%s); showing the study alone", path, exc)
        return None
    return data if isinstance(data, dict) else None


_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def printable(text: Any) -> str:
    """Stored text made safe to print to a terminal: control characters (ESC starts escape
    sequences that clear the screen, move the cursor, set the window title...) shown as their
    Python escapes (``\\x1b``); newlines and tabs kept."""
    return str(text).translate(_CONTROL)


def as_markup(text: Any) -> str:
    """Stored text for a Rich markup string: control characters neutralised and ``[`` escaped, so
    a message that contains ``[/red]`` prints as written instead of raising ``MarkupError``."""
    from rich.markup import escape

    return escape(printable(text))


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def trials_table(
    trials: list[TrialRecord], baseline: Measurement | None, *, limit: int = 10, title: str = "best trials"
) -> Table:
    from rich.table import Table

    table = Table(title=title)
    # Measured speedup next to the FLOPs reduction, when the run timed its trials.
    base_latency = baseline.latency_ms if baseline is not None else None
    speed = base_latency is not None
    columns = ["trial", "feasible", "metric", "bytes", "size ratio", "nonzero ratio"]
    columns += ["FLOPs reduction", "speedup"] if speed else []
    for column in columns + ["time s"]:
        table.add_column(column, justify="right")
    done = [(t, t.measurement) for t in trials if t.measurement is not None]
    done.sort(
        key=lambda pair: (not pair[0].feasible, pair[0].objective if pair[0].objective is not None else float("inf"))
    )
    for t, m in done[:limit]:
        ratio = f"{baseline.size_bytes / m.size_bytes:.1f}x" if baseline else "-"
        cells = [
            str(t.number),
            "yes" if t.feasible else "no",
            _fmt_metric(m.metric),
            f"{m.size_bytes:,}",
            ratio,
            f"{m.nonzero_ratio:.1f}x",
        ]
        if baseline is not None and base_latency is not None:  # speed
            cells.append(f"{baseline.flops / m.flops:.2f}x" if baseline.flops and m.flops else "-")
            cells.append(f"{base_latency / m.latency_ms:.2f}x" if m.latency_ms else "-")
        cells.append(f"{t.duration_s:.1f}" if t.duration_s is not None else "-")
        table.add_row(*cells)
    return table


def summary_table(rows: list[tuple[str, str, str]], title: str = "result") -> Table:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def left_alone_table(entries: list[dict[str, Any]], *, limit: int = 10) -> Table:
    """What no operator compressed (``summary.json``'s ``left_alone``: name, type, params, reason),
    the largest first; ``limit`` rows, the rest counted in the title."""
    from rich.table import Table
    from rich.text import Text

    shown = sorted(entries, key=lambda e: -e["params"])[:limit]
    more = f", {len(entries) - len(shown)} more in summary.json" if len(entries) > len(shown) else ""
    table = Table(title=f"left alone ({len(entries)}{more})")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("name", "left"),
        ("type", "left"),
        ("params", "right"),
        ("reason", "left"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for e in shown:
        table.add_row(
            *(Text(printable(cell)) for cell in (e["name"], e["type"], f"{e['params']:,}", e["reason"]))
        )  # not markup
    return table


def run_counts(trials: list[TrialRecord]) -> str:
    complete = sum(t.state == "COMPLETE" for t in trials)
    feasible = sum(t.feasible for t in trials)
    failed = sum(t.state == "FAIL" for t in trials)
    running = sum(t.state == "RUNNING" for t in trials)
    screened = sum(t.fidelity == "screen" or t.state == "PRUNED" for t in trials)
    stopped = sum(t.fidelity == "stopped" for t in trials)
    screened_text = f", {screened} screened (cheap evaluation)" if screened else ""
    capped = sum(t.fidelity == "capped" for t in trials)
    screened_text += f", {stopped} stopped mid-fine-tune" if stopped else ""
    screened_text += f", {capped} capped undecided (estimates)" if capped else ""
    return f"{len(trials)} trials: {complete} complete ({feasible} feasible){screened_text}, {failed} failed, {running} running"
