"""The `tightfit` command line. It calls the public Python API and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from rich.table import Table
    from torch import nn

    from ..export.verified import ExportReport
    from ..iterative import AdjustRound
    from ..records import Result, TrialRecord
    from ..report.view import RunView

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fit a trained PyTorch network into a budget: compress, search, fine-tune, measure.",
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    from ..report.view import as_markup

    # escaped: messages quote user text and brackets (e.g. "tightfit[speed]") that are not markup,
    # and text read from files, whose control characters must not reach the terminal
    err_console.print(f"[bold red]error:[/] {as_markup(exc)}")
    raise typer.Exit(code=2)


def _show_result(result: Result, extra_rows: list[tuple[str, str, str]] | None = None) -> None:
    from ..report import left_alone_table, run_counts, summary_table, trials_table
    from ..report.view import printable

    console.print(trials_table(result.trials, result.baseline, limit=8))
    if result.left_alone:
        console.print(left_alone_table([dataclasses.asdict(m) for m in result.left_alone]))
    base = result.baseline
    rows = _metric_rows(result.baseline_metric, result.metric, result.metric_before_recovery, result.recovery) + [
        ("file bytes", f"{result.baseline_size_bytes:,}", f"{result.size_bytes:,}"),
        ("size ratio", "1.0x", f"{result.compression_ratio:.1f}x"),
        ("nonzero-weight ratio", "1.0x", f"{result.nonzero_ratio:.1f}x"),
    ]
    if base is not None and result.objective == "metric":  # the budget is often MaxBits: say where it stands
        rows.append(("bits per weight", "", f"{result.size_bytes * 8 / max(1, base.weight_params):.2f}"))
    console.print(
        summary_table(rows + (extra_rows or []), title="result" if result.feasible else "result: nothing feasible")
    )
    if result.recovery:
        console.print(_recovery_table(result.recovery))
    console.print(run_counts(result.trials))
    cost = getattr(result, "accounting", None) or {}
    if cost:
        passes = cost.get("val_samples")
        console.print(
            f"cost: {passes:,} validation forward passes, " if passes is not None else "cost: ",
            f"{cost.get('finetune_steps', 0):,} fine-tuning steps, {cost.get('search_wall_s', 0.0):.1f} s searching",
            sep="",
        )
        times = cost.get("time")
        if times:  # how the run's wall time was spent (summary.json: accounting.time)
            parts = ", ".join(
                f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in times.items() if k != "total_s"
            )
            console.print(f"time: {times['total_s']:.1f} s in all: {parts}", markup=False)
    console.print(printable(result.message), markup=False)
    for note in result.notes:
        console.print("note: " + printable(note), markup=False, style="yellow")
    if result.run_dir:
        console.print(
            f"run directory: {printable(result.run_dir)} (model.tfz, summary.json, trials.csv, trials.png, study.db)",
            markup=False,
        )


def _metric_rows(
    baseline_metric: float, metric: float, before: float | None, recovery: dict | None
) -> list[tuple[str, str, str]]:
    """The validation metric; with ``recover=``, the answer's metric in the search (before its
    recovery after the search) and after it."""
    if before is None:
        return [("validation metric", f"{baseline_metric:.4f}", f"{metric:.4f}")]
    seconds = (recovery or {}).get("seconds")
    took = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
    return [
        ("validation metric, before recovery", f"{baseline_metric:.4f}", f"{before:.4f}"),
        ("validation metric, after recovery" + took, "", f"{metric:.4f}"),
    ]


def _recovery_table(recovery: dict) -> Table:
    """Each plan recovered after the search: its metric before and after, whether it still met the
    constraints, and which one is the answer (read from a result or summary.json: shown as data)."""
    from rich.table import Table

    from ..report.view import printable

    table = Table(title="recovery after the search")
    for column in ("trial", "metric before", "metric after", "constraints after", ""):
        table.add_column(column)
    for row in recovery.get("trials", []):
        chosen = "answer" if row.get("trial") == recovery.get("chosen") else ""
        table.add_row(
            printable(str(row.get("trial"))),
            f"{row['metric_before']:.4f}",
            f"{row['metric_after']:.4f}",
            "met" if row.get("feasible") else "broken",
            chosen,
        )
    return table


@app.command()
def demo(
    budget: Annotated[int, typer.Option(help="Evaluations in the search.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed for data split, training and search.")] = 0,
    run_dir: Annotated[Path, typer.Option(help="Where the run is written (and resumed from).")] = Path("runs/demo"),
    search: Annotated[
        str, typer.Option(help="Search method (the demo's default is explained in tightfit/demo/run.py).")
    ] = "tpe",
) -> None:
    """Compress LeNet-300-100 trained on scikit-learn's digits (built-in data, no download)."""
    from ..demo.run import run_demo
    from ..errors import TightfitError

    try:
        result, test = run_demo(budget=budget, seed=seed, run_dir=run_dir, search=search, console=console)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume the search.")
        raise typer.Exit(code=130) from None
    _show_result(result, [("test accuracy (unseen split)", f"{test[0]:.4f}", f"{test[1]:.4f}")])


_HEARTBEAT_HELP = "Seconds between a running trial's heartbeats in a shared storage."
_GRACE_HELP = "Seconds without heartbeat after which a trial's worker is taken for dead and the trial retried."


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="The run's TOML config (see the README).")],
    workers: Annotated[int, typer.Option(min=1, help="Processes evaluating trials (this one included).")] = 1,
    heartbeat_interval: Annotated[int, typer.Option(min=1, help=_HEARTBEAT_HELP)] = 10,
    grace_period: Annotated[int, typer.Option(min=2, help=_GRACE_HELP)] = 60,
) -> None:
    """Compress your model as CONFIG says; run again to resume. With --workers N, N-1 `tightfit
    worker` processes join this one on the study (logs in RUN_DIR/workers/)."""
    from ..cli.config import build_arguments, check_run, load_config
    from ..errors import TightfitError
    from ..pipeline import compress
    from ..run_dir import RunDir
    from ..scale import open_storage, redact
    from ..scale.local import LocalWorkers

    started: list[LocalWorkers] = []

    def start_workers(url: str, study_name: str) -> None:
        if workers > 1:
            log_dir = Path(arguments["run_dir"]) / "workers"
            started.append(
                LocalWorkers(config, workers - 1, url, study_name, log_dir, heartbeat_interval, grace_period)
            )
            console.print(f"started {workers - 1} worker(s) on {redact(url)}, study {study_name!r} (logs: {log_dir})")

    try:
        parsed, base = load_config(config)
        arguments = build_arguments(parsed, base, config)
        check_run(arguments)  # compress's own checks, before the run directory and the study are made
        console.print(f"run directory: {arguments['run_dir']}", markup=False)
        # the run directory's lock before the storage: two runs started on a new directory must not
        # both create its study (compress takes the same lock again, re-entrantly)
        with RunDir.open(arguments["run_dir"]) as held:
            url = arguments["storage"] or held.storage_url
            arguments["storage"] = open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
            result = compress(**arguments, progress=True, on_start=start_workers)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume the search.")
        raise typer.Exit(code=130) from None
    finally:
        for group in started:
            group.stop()
    _show_result(result)


@app.command("prune-adjust")
def prune_adjust(
    config: Annotated[
        Path,
        typer.Argument(help="The run's TOML config; its prune_adjust section sets the rounds (see docs/recovery.md)."),
    ],
) -> None:
    """OLMP's prune-and-adjust: rounds of threshold search without training, each trained by the
    finetune section's recovery, kept while the model stays within constraint.max_drop; run again to resume."""
    from ..cli.config import load_config, prune_adjust_arguments
    from ..errors import TightfitError
    from ..iterative import prune_and_adjust as run_rounds

    shown: set[int] = set()

    def show(r: AdjustRound) -> None:
        shown.add(r.number)
        _show_round(r)

    try:
        parsed, base = load_config(config)
        arguments = prune_adjust_arguments(parsed, base, config)
        console.print(f"run directory: {arguments['run_dir']}", markup=False)
        result = run_rounds(**arguments, on_round=show)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(
            "interrupted: run the same command again to resume where it stopped (finished rounds and adjusts are kept)."
        )
        raise typer.Exit(code=130) from None
    for r in result.rounds:
        if r.number not in shown:  # rounds of an earlier call, resumed from the run directory
            show(r)
    _show_rounds_result(result.rounds, result.baseline_metric, Path(arguments["run_dir"]))


@app.command("compress-once")
def compress_once(
    config: Annotated[
        Path,
        typer.Argument(
            help="A TOML config whose strategy gives fixed settings (docs/cli.md); calibration and compress_once sections."
        ),
    ],
) -> None:
    """Compress once, no search and no training (tightfit.compress_once): GPTQ / AWQ / Wanda /
    SparseGPT learn from the config's calibration section; the model is evaluated before and after,
    checked against its constraint section if it has one, and written to RUN_DIR/compress-once/."""
    from ..cli.config import load_config, once_arguments
    from ..cli.once import compress_once_run
    from ..errors import TightfitError

    try:
        parsed, base = load_config(config)
        arguments = once_arguments(parsed, base, config)
        console.print(f"run directory: {arguments['run_dir']}", markup=False)
        report = compress_once_run(arguments)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written; run the same command again.")
        raise typer.Exit(code=130) from None
    _show_once(report.to_dict())


def _show_once(r: dict) -> None:
    """A compress-once result (from the run, or ``once.json`` read back: shown as data)."""
    from ..report import summary_table
    from ..report.view import printable

    rows = [
        ("validation metric", f"{r['baseline_metric']:.4f}", f"{r['metric']:.4f}"),
        ("file bytes", f"{r['baseline_size_bytes']:,}", f"{r['size_bytes']:,}"),
        ("size ratio", "1.0x", f"{r['baseline_size_bytes'] / max(1, r['size_bytes']):.1f}x"),
        ("nonzero-weight ratio", "1.0x", f"{r['weight_params'] / max(1, r['nonzeros']):.1f}x"),
        ("bits per weight", "", f"{r['bits_per_weight']:.2f}"),
    ]
    if r.get("flops") is not None:
        rows.append(("FLOPs (nonzero weights)", f"{r['baseline_flops']:,}", f"{r['flops']:,}"))
    met = all(ok for _, _, ok in r.get("constraints", []))
    console.print(summary_table(rows, title="compressed once" + ("" if met else ": constraints not met")))
    for text, value, ok in r.get("constraints", []):
        console.print(f"constraint {printable(text)}: {'met' if ok else 'not met'} (value {value:+.4g})", markup=False)
    if r.get("calibration"):
        repairs = ", ".join(
            f"{name} ({len(mods)} module(s) changed)" for name, mods in (r.get("repaired") or {}).items()
        )
        console.print(
            f"calibration: {printable(r['calibration'])}, {r.get('calibration_passes', 0)} pass(es), "
            f"{r.get('seconds', 0.0):.1f} s; repairs: {printable(repairs or 'none')}",
            markup=False,
        )
    for layer, why in (r.get("uncalibrated") or {}).items():
        console.print(f"uncalibrated {printable(layer)}: {printable(why)}", markup=False, style="yellow")
    for layer, why in (r.get("not_fitted") or {}).items():
        console.print(f"not fitted to the original {printable(layer)}: {printable(why)}", markup=False, style="yellow")
    if r.get("run_dir"):
        console.print(f"run directory: {printable(r['run_dir'])} (model.tfz, once.json)", markup=False)


def _show_round(r: AdjustRound) -> None:
    verdict = "kept" if r.accepted else "undone"
    console.print(
        f"round {r.number}: step {r.step:.4g}, {r.nonzero_ratio:.1f}x fewer nonzeros, "
        f"metric {r.metric:.4f}, {verdict} ({r.wall_s:.1f} s)"
    )


def _show_rounds_result(rounds: list[AdjustRound], baseline_metric: float, run_dir: Path) -> None:
    """The answer of a prune-and-adjust run: its last kept round."""
    from ..report import summary_table

    kept = [r for r in rounds if r.accepted]
    last = kept[-1] if kept else None
    rows = [
        ("validation metric", f"{baseline_metric:.4f}", f"{(last.metric if last else baseline_metric):.4f}"),
        ("nonzero-weight ratio", "1.0x", f"{(last.nonzero_ratio if last else 1.0):.1f}x"),
        ("training steps", "", f"{sum(r.training_steps or 0 for r in rounds):,}"),
    ]
    console.print(summary_table(rows, title="result" if last else "result: no round was kept"))
    model = run_dir / "model.tfz"
    if last and model.exists():
        console.print(f"model: {model} ({model.stat().st_size:,} bytes; rounds in rounds.json)", markup=False)


@app.command()
def worker(
    config: Annotated[Path, typer.Argument(help="The same TOML config as the run's (model, data, strategy...).")],
    storage: Annotated[
        str | None,
        typer.Option(
            help="Storage URL of the study, e.g. postgresql://user:pw@host/db (default: the config's `storage`, else its run directory's study.db)."
        ),
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the config's study_name).")] = None,
    heartbeat_interval: Annotated[int, typer.Option(min=1, help=_HEARTBEAT_HELP)] = 10,
    grace_period: Annotated[int, typer.Option(min=2, help=_GRACE_HELP)] = 60,
) -> None:
    """Join a study and evaluate its trials until its budget is used; start any number, anywhere."""
    import logging
    import os
    import signal

    from ..cli.config import build_arguments, load_config
    from ..errors import TightfitError
    from ..run_dir import RunDir
    from ..scale import open_storage, redact, work

    def interrupt(signum, frame):  # SIGTERM: re-queue the running trial like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        parsed, base = load_config(config)
        arguments = build_arguments(parsed, base, config)
        url = storage or arguments["storage"] or RunDir(Path(arguments["run_dir"])).storage_url
        name = study or arguments["study_name"]
        arguments.update(
            storage=open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period), study_name=name
        )
        console.print(f"worker {os.getpid()}: study {name!r} on {redact(url)}")
        evaluated = work(**arguments)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print(f"worker {os.getpid()} interrupted: its running trial is queued again.")
        raise typer.Exit(code=130) from None
    console.print(f"worker {os.getpid()}: done, evaluated {evaluated} trial(s)")


@app.command()
def report(
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory.")] = None,
    storage: Annotated[str | None, typer.Option(help="An Optuna storage URL instead of a run directory.")] = None,
    study: Annotated[str, typer.Option(help="Study name in the storage.")] = "tightfit",
    top: Annotated[int, typer.Option(help="How many trials to list.")] = 10,
) -> None:
    """Summary and best trials of a finished or running run (or a prune-adjust / compress-once one)."""
    from ..cli.once import ONCE_FILE, load_once
    from ..errors import TightfitError
    from ..iterative import ROUNDS_FILE, load_rounds
    from ..report import load_run, run_counts, trials_table
    from ..report.view import as_markup, printable

    if run_dir is not None and storage is None and (run_dir / ONCE_FILE).exists():  # a compress-once run
        try:
            _show_once(load_once(run_dir))
        except (TightfitError, KeyError, TypeError, ValueError) as exc:
            _fail(
                ValueError(f"{run_dir / ONCE_FILE} does not hold what tightfit writes ({type(exc).__name__}: {exc}).")
            )
        return
    if run_dir is not None and storage is None and (run_dir / ROUNDS_FILE).exists():  # a prune-adjust run
        try:
            settings, rounds, _ = load_rounds(run_dir)
        except (ValueError, KeyError, TypeError) as exc:  # JSON that is not tightfit's: say so, no traceback
            _fail(
                ValueError(f"{run_dir / ROUNDS_FILE} does not hold what tightfit writes ({type(exc).__name__}: {exc}).")
            )
        for r in rounds:
            _show_round(r)
        _show_rounds_result(rounds, settings["baseline_metric"], run_dir)
        return
    try:
        view = load_run(run_dir, storage=storage, study_name=study)
    except TightfitError as exc:
        _fail(exc)
    console.print(trials_table(view.trials, view.baseline, limit=top))
    console.print(run_counts(view.trials))
    _show_trial_errors(view.trials)
    if view.settings:  # stored text: printed as data, never as markup or terminal control
        settings = view.settings
        console.print(
            f"objective: {as_markup(settings.get('objective'))}  "
            f"constraints: {as_markup(', '.join(map(str, settings.get('constraints', []))))}  "
            f"search: {as_markup(settings.get('search'))}  seed: {as_markup(settings.get('seed'))}"
        )
        if settings.get("calibration"):
            console.print(f"calibration: {as_markup(settings['calibration'])}")
    s = view.summary
    if s is None:
        console.print("[yellow]no final summary yet: the run is in progress or was interrupted[/]")
        return
    try:
        _show_summary(s, view)
    except (KeyError, TypeError, ValueError) as exc:  # a summary.json edited or written by another tool
        _fail(
            ValueError(
                f"summary.json in {run_dir} does not hold what tightfit writes ({type(exc).__name__}: {exc}); "
                "the trials above are read from the study."
            )
        )
    console.print(printable(s.get("message", "")), markup=False)


def _show_trial_errors(trials: list[TrialRecord], limit: int = 3) -> None:
    """The first few distinct errors of failed trials, as stored (text, never markup)."""
    from ..report.view import printable

    shown: dict[str, int] = {}
    for t in trials:
        if t.state == "FAIL" and t.error and t.error not in shown and len(shown) < limit:
            shown[t.error] = t.number
    for error, number in shown.items():
        console.print(f"failed trial {number}: {printable(error)}", markup=False, style="red")


def _show_summary(s: dict, view: RunView) -> None:
    from ..report import left_alone_table, summary_table

    if s.get("left_alone"):
        console.print(left_alone_table(s["left_alone"]))
    base = s["baseline"] or {}
    rows = _metric_rows(s["baseline_metric"], s["metric"], s.get("metric_before_recovery"), s.get("recovery")) + [
        ("file bytes", f"{s['baseline_size_bytes']:,}", f"{s['size_bytes']:,}"),
        ("size ratio", "1.0x", f"{s['compression_ratio']:.1f}x"),
        ("nonzero-weight ratio", "1.0x", f"{s['nonzero_ratio']:.1f}x"),
    ]
    if base.get("flops"):
        best = next((t for t in view.trials if t.number == s.get("best_trial")), None)
        flops = best.measurement.flops if best is not None and best.measurement is not None else None
        rows.append(("FLOPs (nonzero weights)", f"{base['flops']:,}", f"{flops:,}" if flops else "-"))
    if s.get("objective") == "metric" and isinstance(s.get("bits_per_weight"), (int, float)):
        rows.append(("bits per weight", "", f"{s['bits_per_weight']:.2f}"))
    console.print(summary_table(rows))
    if s.get("recovery"):
        console.print(_recovery_table(s["recovery"]))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (holds model.tfz and example_input.pt).")],
    config: Annotated[
        Path | None,
        typer.Option(help="The run's TOML config: its model.factory builds the model that model.tfz is loaded into."),
    ] = None,
    factory: Annotated[
        str | None,
        typer.Option(
            help="Instead of --config: import path of a function returning a fresh instance of the run's model, e.g. my_models:build (for runs made from Python)."
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN_DIR/export/model.<ext>).")] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the output check.")] = 1e-4,
    rtol: Annotated[
        float | None,
        typer.Option(
            help="Tolerance relative to the largest reference output (default 1e-3; 0.05 with int8; 0.02 with --dtype)."
        ),
    ] = None,
    int8: Annotated[str | None, typer.Option(help="dynamic or static: int8 via ONNX Runtime (onnx only).")] = None,
    keep_float: Annotated[list[str] | None, typer.Option(help="Layer-name pattern left in float (repeatable).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="bfloat16 or float16 (torchscript/pt): run in 16-bit floats.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size the latency is measured at.")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads the latency is measured with.")] = None,
) -> None:
    """Write the run's model as ONNX/TorchScript/pt, reload it, check its outputs, time it.

    model.tfz is loaded into the model the run's config builds (--config) or --factory builds, or,
    without either, rebuilt from its data-only architecture (torch.nn layers only); no code stored
    in the run directory runs. A failed output check is an error (exit code 2), not a warning.
    """
    from ..errors import ArtifactError, TightfitError
    from ..export import export_run
    from ..export.verified import check_export_options

    model = None
    try:
        check_export_options(format, int8, dtype)  # `--format xyz` is an error before anything is read
        model = _config_model(config, factory, run_dir)
        rep = export_run(
            run_dir,
            model=model,
            format=format,
            out=out,
            atol=atol,
            rtol=rtol,
            batch_size=batch_size,
            threads=threads,
            int8=int8,
            keep_float=keep_float,
            dtype=dtype,
        )
    except ArtifactError as exc:
        if model is None and "model=" in str(exc):  # the file holds no architecture as data: a user class
            exc = ArtifactError(
                f"{exc} On the command line: --config CONFIG (the run's config builds the model) "
                "or --factory module:function."
            )
        _fail(exc)
    except TightfitError as exc:
        _fail(exc)
    _show_export(rep)
    console.print(f"report written to {rep.path}.json")


def _show_export(rep: ExportReport) -> None:
    """The export report as a table: file, size, the output check and the two latencies."""
    from rich.table import Table

    rows = [
        ("file", rep.path, ""),
        ("file bytes", f"{rep.size_bytes:,}", ""),
        (
            "max |exported - pytorch|",
            f"{rep.max_abs_diff:.3g}",
            f"<= {rep.atol:g} + {rep.rtol:g}*{rep.reference_max_abs:.3g}: passed",
        ),
        ("latency ms (pytorch / exported)", f"{rep.reference_latency_ms:.4g}", f"{rep.latency_ms:.4g}"),
    ]
    table = Table(
        title=f"export: {rep.format}{' int8 ' + rep.int8 if rep.int8 else ''}{' ' + rep.dtype if rep.dtype else ''}"
    )
    for column in ("", "value", "check"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _config_model(config: Path | None, factory: str | None, run_dir: Path) -> nn.Module | None:
    """The model that ``tightfit export`` loads model.tfz into (None: the file's own architecture): built by the run's config
    (``model.factory`` with its ``kwargs``; the config's folder on the import path, as for
    ``tightfit run``), or by ``--factory`` (an import path, the current directory importable)."""
    import os
    import sys

    import torch

    from ..cli.config import load_config, resolve_import
    from ..errors import ConfigError

    if config is not None and factory is not None:
        raise ConfigError("export: pass --config CONFIG or --factory module:function, not both.")
    if config is None and factory is None:
        return None  # model.tfz's data-only architecture is rebuilt (torch.nn layers only; nothing is unpickled)
    if config is not None:
        parsed, _ = load_config(config)
        field, path, kwargs = "model.factory", parsed.model.factory, parsed.model.kwargs
    else:
        assert factory is not None  # one of the two, checked above
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # last: a local file never shadows an installed package
        field, path, kwargs = "--factory", factory, {}
    try:
        model = resolve_import(path)(**kwargs)
    except Exception as exc:
        raise ConfigError(f"{field}: calling {path!r} failed ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{field}: {path!r} returned a {type(model).__name__}, not an nn.Module.")
    return model


def main() -> None:
    app()


if __name__ == "__main__":
    main()
