"""A damaged study.db is never silently replaced: a rerun and `tightfit report` refuse it with what
to do and change no file; two runs on a new run directory do not both open its storage."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tightfit
from tightfit.cli.app import app
from tightfit.errors import ConfigError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _arguments(run_dir: Path) -> dict:
    return dict(
        evaluate=lambda m: 1.0,
        constraint=tightfit.MaxDrop(1.0),
        budget=2,
        search="random",
        run_dir=run_dir,
        pick="observed",
        example_input=torch.randn(2, 8),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert tightfit.compress(_model(), **_arguments(run)).feasible
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


DAMAGE = {
    "truncated to 0 bytes": lambda data: b"",
    "cut in half": lambda data: data[: len(data) // 2],
    "random bytes": lambda data: os.urandom(len(data)),
    "pages overwritten": lambda data: data[:4096] + b"\xff" * (len(data) - 8192) + data[-4096:],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_rerun_and_the_report_refuse_a_damaged_study_and_touch_nothing(finished, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    db = run_dir / "study.db"
    db.write_bytes(DAMAGE[damage](db.read_bytes()))
    before = _files(run_dir)
    with pytest.raises(ConfigError, match=r"study\.db.*nothing was changed.*move the directory"):
        tightfit.compress(_model(), **_arguments(run_dir))
    assert _files(run_dir) == before  # model.tfz, summary.json, the damaged study: byte for byte
    shown = CliRunner().invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 2 and "study.db" in shown.output, shown.output
    assert "Traceback" not in shown.output and "DatabaseError" not in shown.output.replace("is damaged", "")
    assert _files(run_dir) == before


def test_an_empty_study_in_a_new_directory_is_just_started(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "study.db").write_bytes(b"")  # a run killed while SQLite created the file: nothing to lose
    assert len(tightfit.compress(_model(), **_arguments(run_dir)).trials) == 2


def test_the_run_command_takes_the_lock_before_it_opens_the_storage(tmp_path):
    (tmp_path / "lockmods.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
        "def metric(model):\n    return 1.0\n"
    )
    config = tmp_path / "lock.toml"
    config.write_text(
        'budget = 2\nrun_dir = "runs/lock"\n[model]\nfactory = "lockmods:build"\n[evaluate]\n'
        'function = "lockmods:metric"\n[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 1.0\n'
    )
    run_dir = tmp_path / "runs" / "lock"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "a+") as other:  # another run holds the new directory
        fcntl.flock(other, fcntl.LOCK_EX)
        shown = CliRunner().invoke(app, ["run", str(config)])
        assert shown.exit_code == 2 and "in use" in shown.output, shown.output
        assert not (run_dir / "study.db").exists()  # its storage was not opened (nor created) under it
