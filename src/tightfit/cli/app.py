"""The `tightfit` command line. It calls the public Python API and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fit a trained PyTorch network into a budget: compress, search, fine-tune, measure.",
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _show_result(result, extra_rows: list[tuple[str, str, str]] | None = None) -> None:
    from ..report import run_counts, summary_table, trials_table

    console.print(trials_table(result.trials, result.baseline, limit=8))
    rows = [
        ("validation metric", f"{result.baseline_metric:.4f}", f"{result.metric:.4f}"),
        ("file bytes", f"{result.baseline_size_bytes:,}", f"{result.size_bytes:,}"),
        ("size ratio", "1.0x", f"{result.compression_ratio:.1f}x"),
        ("nonzero-weight ratio", "1.0x", f"{result.nonzero_ratio:.1f}x"),
    ]
    console.print(summary_table(rows + (extra_rows or []), title="result" if result.feasible else "result: nothing feasible"))
    console.print(run_counts(result.trials))
    console.print(result.message)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.run_dir:
        console.print(f"run directory: {result.run_dir} (model.tfz, summary.json, trials.csv, trials.png, study.db)")


@app.command()
def demo(
    budget: Annotated[int, typer.Option(help="Evaluations in the search.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed for data split, training and search.")] = 0,
    run_dir: Annotated[Path, typer.Option(help="Where the run is written (and resumed from).")] = Path("runs/demo"),
    search: Annotated[str, typer.Option(help="Search method.")] = "auto",
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
        raise typer.Exit(code=130)
    _show_result(result, [("test accuracy (unseen split)", f"{test[0]:.4f}", f"{test[1]:.4f}")])


@app.command()
def run(config: Annotated[Path, typer.Argument(help="The run's TOML config (see the README).")]) -> None:
    """Compress your model as CONFIG says; run again to resume."""
    import tightfit

    from ..cli.config import build_arguments, load_config
    from ..errors import TightfitError

    try:
        parsed, base = load_config(config)
        arguments = build_arguments(parsed, base, config)
        console.print(f"run directory: {arguments['run_dir']}")
        result = tightfit.compress(**arguments, progress=True)
    except TightfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume the search.")
        raise typer.Exit(code=130)
    _show_result(result)


@app.command()
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run directory.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="An Optuna storage URL instead of a run directory.")] = None,
    study: Annotated[str, typer.Option(help="Study name in the storage.")] = "tightfit",
    top: Annotated[int, typer.Option(help="How many trials to list.")] = 10,
) -> None:
    """Summary and best trials of a finished or running run."""
    from ..errors import TightfitError
    from ..report import load_run, run_counts, summary_table, trials_table

    try:
        view = load_run(run_dir, storage=storage, study_name=study)
    except TightfitError as exc:
        _fail(exc)
    console.print(trials_table(view.trials, view.baseline, limit=top))
    console.print(run_counts(view.trials))
    if view.settings:
        console.print(
            f"objective: {view.settings.get('objective')}  constraints: {', '.join(view.settings.get('constraints', []))}  "
            f"search: {view.settings.get('search')}  seed: {view.settings.get('seed')}"
        )
    s = view.summary
    if s is None:
        console.print("[yellow]no final summary yet: the run is in progress or was interrupted[/]")
        return
    base = s["baseline"] or {}
    rows = [
        ("validation metric", f"{s['baseline_metric']:.4f}", f"{s['metric']:.4f}"),
        ("file bytes", f"{s['baseline_size_bytes']:,}", f"{s['size_bytes']:,}"),
        ("size ratio", "1.0x", f"{s['compression_ratio']:.1f}x"),
        ("nonzero-weight ratio", "1.0x", f"{s['nonzero_ratio']:.1f}x"),
    ]
    if base.get("flops"):
        rows.append(("FLOPs (nonzero weights)", f"{base['flops']:,}", "-"))
    console.print(summary_table(rows))
    console.print(s["message"])


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (holds model.tfz and example_input.pt).")],
    format: Annotated[str, typer.Option("--format", help="onnx, torchscript or pt.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN_DIR/export/model.<ext>).")] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the output check.")] = 1e-4,
    rtol: Annotated[Optional[float], typer.Option(help="Tolerance relative to the largest reference output (default 1e-3; 0.05 with int8; 0.02 with --dtype).")] = None,
    int8: Annotated[Optional[str], typer.Option(help="dynamic or static: int8 via ONNX Runtime (onnx only).")] = None,
    keep_float: Annotated[Optional[list[str]], typer.Option(help="Layer-name pattern left in float (repeatable).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16 or float16 (torchscript/pt): run in 16-bit floats.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size the latency is measured at.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads the latency is measured with.")] = None,
) -> None:
    """Write the run's model as ONNX/TorchScript/pt, reload it, check its outputs, time it.

    A failed output check is an error (exit code 2), not a warning.
    """
    from ..errors import TightfitError
    from rich.table import Table

    from ..export import export_run

    try:
        rep = export_run(run_dir, format=format, out=out, atol=atol, rtol=rtol, batch_size=batch_size,
                         threads=threads, int8=int8, keep_float=keep_float, dtype=dtype)
    except TightfitError as exc:
        _fail(exc)
    rows = [
        ("file", rep.path, ""),
        ("file bytes", f"{rep.size_bytes:,}", ""),
        ("max |exported - pytorch|", f"{rep.max_abs_diff:.3g}",
         f"<= {rep.atol:g} + {rep.rtol:g}*{rep.reference_max_abs:.3g}: passed"),
        ("latency ms (pytorch / exported)", f"{rep.reference_latency_ms:.4g}", f"{rep.latency_ms:.4g}"),
    ]
    table = Table(title=f"export: {rep.format}{' int8 ' + rep.int8 if rep.int8 else ''}{' ' + rep.dtype if rep.dtype else ''}")
    for column in ("", "value", "check"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"report written to {rep.path}.json")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
