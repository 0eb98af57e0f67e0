"""Atomic, durable writes: a process killed at any moment of tightfit.save, PruneAdjustResult.save,
summary.json, trials.csv or example_input.pt leaves the complete old file or the complete new one."""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tightfit
from tightfit._io import TEMP_PREFIX, write_atomic
from tightfit.cli.app import app
from tightfit.export.artifact import to_bytes
from tightfit.iterative import PruneAdjustResult
from tightfit.report.files import write_summary, write_trials_csv
from tightfit.run_dir import RunDir

TARGETS = ("model.tfz", "adjusted.tfz", "summary.json", "trials.csv", "example_input.pt")


def test_write_atomic_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name.startswith(TEMP_PREFIX + "x.json.")))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "x.json", b"{}")
    assert events == [("fsync", "file"), ("replace", True), ("fsync", "dir")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_atomic(target, b'{"old": 1}')

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b'{"new": 2}')
    assert target.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_temporary_names_are_unique_per_write(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(Path(src).name), real_replace(src, dst)))
    for _ in range(3):
        write_atomic(tmp_path / "m.tfz", b"x")
    assert len(set(names)) == 3 and all(n.startswith(TEMP_PREFIX) and n.endswith(".tmp") for n in names)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two different contents for each run file, written once by the functions under test: the
    expected bytes of the 'A' and 'B' version of each file, and the arguments that write them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    result = tightfit.compress(
        model, evaluate=lambda m: 1.0, constraint=tightfit.MaxDrop(1.0), budget=1, search="random", pick="observed"
    )
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(-1)
    versions = {}
    for tag, source, rows, fill in (("A", model, 300, "a"), ("B", other, 200, "b")):
        variant = copy.copy(result)
        variant.artifact = to_bytes(source)
        adjusted = PruneAdjustResult(source, None, 1.0, 1.0, 1.0, [], to_bytes(source, None, {"round": tag}))
        trials = [result.trials[0]] * rows  # CSVs of different lengths: a cut one has fewer rows
        settings = {"version": tag, "pad": fill * 50_000}
        example = torch.full((32, 128), float(ord(fill)))
        versions[tag] = (variant, adjusted, trials, settings, example)
    expected = {}
    for tag, arguments in versions.items():
        folder = tmp_path_factory.mktemp(f"ref{tag}")
        _write_all(folder, *arguments)
        expected[tag] = {name: (folder / name).read_bytes() for name in TARGETS}
    assert all(expected["A"][n] != expected["B"][n] for n in TARGETS)
    return versions, expected, model


def _write_all(folder: Path, result, adjusted, trials, settings, example) -> None:
    tightfit.save(result, folder / "model.tfz")
    adjusted.save(folder / "adjusted.tfz")
    write_summary(result, folder / "summary.json", settings)
    write_trials_csv(trials, folder / "trials.csv", result.baseline)
    RunDir(folder).write_example_input(example)


def _writer(folder: Path, versions, tag: str) -> None:
    """The child: write ``tag``'s version, then the other, and so on until killed. Never returns."""
    try:
        torch.set_num_threads(1)  # a forked child must not use the parent's thread pool
        while True:
            _write_all(folder, *versions[tag])
            tag = "B" if tag == "A" else "A"
    finally:
        os._exit(0)


def _check(folder: Path, expected, model, seen: dict) -> None:
    names = {p.name for p in folder.iterdir()}
    strays = names - set(TARGETS)
    assert all(n.startswith(TEMP_PREFIX) and n.endswith(".tmp") for n in strays), strays
    assert {p.name for p in folder.glob("*.tfz")} <= {"model.tfz", "adjusted.tfz"}  # no temporary is taken for one
    for name in TARGETS:
        path = folder / name
        if not path.exists():
            assert name not in seen, f"{name} vanished"
            continue
        data = path.read_bytes()
        tag = next((t for t in ("A", "B") if data == expected[t][name]), None)
        assert tag is not None, f"{name}: {len(data)} bytes, neither the old nor the new file"
        seen.setdefault(name, set()).add(tag)
    if (folder / "summary.json").exists():  # and each parses as what it is
        assert json.loads((folder / "summary.json").read_text())["settings"]["version"] in "AB"
    if (folder / "trials.csv").exists():
        with open(folder / "trials.csv", newline="") as handle:
            assert len(list(csv.DictReader(handle))) in (300, 200)
    if (folder / "example_input.pt").exists():
        assert torch.load(folder / "example_input.pt", weights_only=True).shape == (32, 128)
    if (folder / "model.tfz").exists():
        tightfit.load(folder / "model.tfz", model=model)


def _kill_repeatedly(tmp_path: Path, two_versions, kills: int) -> dict:
    versions, expected, model = two_versions
    folder = tmp_path / "run"
    folder.mkdir()
    started = time.perf_counter()
    _write_all(tmp_path, *versions["A"])  # how long one round of writes takes here
    cycle = time.perf_counter() - started
    rng = random.Random(0)
    seen: dict = {}
    for _ in range(kills):
        first = rng.choice("AB")
        pid = os.fork()
        if pid == 0:
            _writer(folder, versions, first)
        time.sleep(rng.uniform(0.0, 3.0 * cycle))  # a forked child starts slower than a warm loop
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _check(folder, expected, model, seen)
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_writes_leave_the_old_or_the_new_file_fast(tmp_path, two_versions):
    seen = _kill_repeatedly(tmp_path, two_versions, kills=10)
    assert seen  # the writer got through at least one file before a kill


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_writes_leave_the_old_or_the_new_file_at_100_random_moments(tmp_path, two_versions):
    seen = _kill_repeatedly(tmp_path, two_versions, kills=100)
    # the kills landed all over the writes: both versions of every file were found after some kill
    assert all(seen.get(name) == {"A", "B"} for name in TARGETS), seen


def test_report_reads_a_run_whose_summary_was_cut_short(tmp_path):
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    tightfit.compress(
        model,
        evaluate=lambda m: 1.0,
        constraint=tightfit.MaxDrop(1.0),
        budget=2,
        search="random",
        run_dir=run_dir,
        pick="observed",
    )
    summary = (run_dir / "summary.json").read_bytes()
    (run_dir / "summary.json").write_bytes(summary[: len(summary) // 2])  # as a non-atomic writer killed midway left it
    shown = CliRunner().invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "2 trials" in shown.output and "no final summary" in shown.output


def test_report_refuses_a_cut_short_rounds_file_without_a_traceback(tmp_path):
    (tmp_path / "rounds.json").write_text('{"settings": {"max_drop"')
    shown = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert shown.exit_code == 2 and "rounds.json does not hold what tightfit writes" in shown.output.replace("\n", "")
