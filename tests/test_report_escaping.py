"""`tightfit report` prints stored text as data: Rich markup in a trial's error or a run's message
is shown as written (it raised MarkupError), and terminal escape sequences are shown, not obeyed."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import tightfit
from tightfit.cli.app import app
from tightfit.report.view import as_markup, printable

HOSTILE = "boom [/red] [bold]x\x1b[2J\x1b]0;title\x07 done"


def test_printable_shows_control_characters_and_keeps_newlines():
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("bell\x07 del\x7f csi\x9b") == "bell\\x07 del\\x7f csi\\x9b"
    assert printable("two\nlines\tand tab") == "two\nlines\tand tab"


def test_as_markup_renders_the_text_as_written():
    console = Console(record=True, width=200, color_system=None)
    console.print(f"[red]error:[/] {as_markup(HOSTILE)}")
    out = console.export_text()
    assert "[/red] [bold]x" in out and "\x1b" not in out and "\\x1b[2J" in out


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """A run whose every trial failed with the hostile error (the original measures fine)."""
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError(HOSTILE)
        return 1.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    result = tightfit.compress(
        model, evaluate=evaluate, constraint=tightfit.MaxDrop(1.0), budget=2, search="random", run_dir=run_dir
    )
    assert not result.feasible and all(t.state == "FAIL" for t in result.trials)
    assert "[/red]" in json.loads((run_dir / "summary.json").read_text())["message"]
    return run_dir


def test_report_prints_a_hostile_trial_error_as_text(failed_run):
    shown = CliRunner().invoke(app, ["report", str(failed_run)])
    assert shown.exit_code == 0, shown.output
    assert shown.exception is None  # no MarkupError
    assert "\x1b" not in shown.output and "\x07" not in shown.output  # nothing reaches the terminal raw
    assert "[/red] [bold]x\\x1b[2J" in shown.output.replace("\n", "")  # the error as written, in the message
    assert "failed trial 0:" in shown.output


def test_report_prints_a_hostile_setting_and_message_as_text(failed_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(failed_run, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["message"] = "[link=file:///etc]click[/link] [/] \x1b[31mred"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    shown = CliRunner().invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "[link=file:///etc]click[/link] [/] \\x1b[31mred" in shown.output and "\x1b" not in shown.output
