"""Run directories never run code: a crafted best.tfz, adjusted.tfz, model.tfz or example_input.pt
in a run directory (each ran a payload before) is loaded as data into the model tightfit already
holds, or refused; and the small run-file faults (a stale .lock, an example input that stored the
whole tensor it was sliced from, compressed FLOPs missing from the report)."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tightfit
from tightfit.cli.app import app
from tightfit.errors import ArtifactError, ConfigError
from tightfit.export.artifact import read_manifest


class _Payload:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _payload_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _poison_tfz(path: Path, marker: Path) -> None:
    """Keep the file's manifest and tensors; plant the payload as a (format-1) pickled architecture."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    files["architecture.pt"] = _payload_bytes(marker)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _arguments(run_dir: Path, **extra) -> dict:
    return dict(
        evaluate=lambda m: 1.0,
        constraint=tightfit.MaxDrop(1.0),
        budget=2,
        example_input=X,
        run_dir=run_dir,
        search="random",
        **extra,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-trial run (copied per test)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    model = _model()
    result = tightfit.compress(model, **_arguments(run))
    assert result.feasible
    return run, model, result


@pytest.fixture
def run(finished, tmp_path):
    source, model, result = finished
    dest = tmp_path / "run"
    shutil.copytree(source, dest)
    return dest, model, result


def test_a_poisoned_best_tfz_is_loaded_as_data_on_resume(run, tmp_path):
    run_dir, model, result = run
    marker = tmp_path / "ran"
    shutil.copy(run_dir / "model.tfz", run_dir / "best.tfz")  # the best trial's model, kept during the search
    assert read_manifest(run_dir / "best.tfz")["trial"] == result.best_trial.number
    _poison_tfz(run_dir / "best.tfz", marker)
    (run_dir / "model.tfz").unlink()
    resumed = tightfit.compress(model, **_arguments(run_dir))  # every trial done: the answer is read from best.tfz
    assert not marker.exists()
    assert torch.equal(resumed.model(X), result.model(X))


def test_a_poisoned_model_tfz_is_loaded_into_the_given_model_by_export(run, tmp_path):
    from tightfit.export import export_run

    run_dir, _, _ = run
    marker = tmp_path / "ran"
    _poison_tfz(run_dir / "model.tfz", marker)
    # A manifest that points at the pickled architecture is refused (it is not format 2's data), with or without model=.
    _set_architecture(run_dir / "model.tfz", True)
    with pytest.raises(ArtifactError, match="architecture"):
        export_run(run_dir, format="torchscript")
    with pytest.raises(ArtifactError, match="architecture"):
        export_run(run_dir, model=_model(), format="torchscript")
    # A pickle planted beside an intact manifest is never read: the data-only architecture.json is rebuilt.
    _set_architecture(run_dir / "model.tfz", "architecture.json")
    plain = export_run(run_dir, format="torchscript", out=tmp_path / "plain.ts")
    report = export_run(run_dir, model=_model(), format="torchscript", out=tmp_path / "m.ts")  # checks outputs
    assert not marker.exists()
    assert report.max_abs_diff <= 1e-5 and plain.max_abs_diff <= 1e-5


def _set_architecture(path: Path, value: object) -> None:
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(files["manifest.json"])
    manifest["architecture"] = value
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def test_a_poisoned_example_input_is_refused_without_running(run, tmp_path):
    from tightfit.export import export_run

    run_dir, _, _ = run
    marker = tmp_path / "ran"
    (run_dir / "example_input.pt").write_bytes(_payload_bytes(marker))
    with pytest.raises(ConfigError, match="example_input.pt.*not an example input"):
        export_run(run_dir, model=_model(), format="torchscript")
    assert not marker.exists()


def test_export_on_the_command_line_builds_the_model_from_the_config(run, tmp_path, monkeypatch):
    run_dir, _, _ = run
    marker = tmp_path / "ran"
    _poison_tfz(run_dir / "model.tfz", marker)
    project = tmp_path / "project"
    project.mkdir()
    (project / "trustmods.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
        "def metric(model):\n    return 1.0\n"
    )
    (project / "run.toml").write_text(
        '[model]\nfactory = "trustmods:build"\n[evaluate]\nfunction = "trustmods:metric"\n'
        '[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 1.0\n'
    )
    shown = CliRunner().invoke(
        app, ["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "plain.ts")]
    )
    assert shown.exit_code == 0 and not marker.exists(), shown.output  # rebuilt from architecture.json, pickle unread
    shown = CliRunner().invoke(
        app, ["export", str(run_dir), "--config", "a.toml", "--factory", "m:f", "--format", "torchscript"]
    )
    assert shown.exit_code == 2 and "not both" in shown.output
    shown = CliRunner().invoke(
        app, ["export", str(run_dir), "--config", str(project / "run.toml"), "--format", "torchscript"]
    )
    assert shown.exit_code == 0, shown.output
    assert not marker.exists() and (run_dir / "export" / "model.ts").exists()
    # a run made from Python: --factory names the function, importable from the current directory
    (project / "trustfactory.py").write_text((project / "trustmods.py").read_text())
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --factory makes the current directory importable
    shown = CliRunner().invoke(
        app,
        [
            "export",
            str(run_dir),
            "--factory",
            "trustfactory:build",
            "--format",
            "torchscript",
            "--out",
            str(tmp_path / "f.ts"),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert not marker.exists() and (tmp_path / "f.ts").exists()


def test_a_poisoned_adjusted_tfz_is_loaded_into_the_held_model_on_resume(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    arguments = dict(
        evaluate=lambda m: 1.0,
        adjust=tightfit.FineTune(loader, epochs=1),
        rounds=1,
        search="random",
        search_budget=2,
        run_dir=tmp_path / "pa",
    )
    first = tightfit.prune_and_adjust(model, **arguments)
    assert first.rounds[0].accepted
    marker = tmp_path / "ran"
    _poison_tfz(tmp_path / "pa" / "round-01" / "adjusted.tfz", marker)
    resumed = tightfit.prune_and_adjust(model, **arguments)  # resumes from round 1's adjusted model
    assert not marker.exists()
    assert torch.equal(resumed.model(x), first.model(x))


def test_example_input_keeps_only_its_own_values(tmp_path):
    big = torch.randn(1797, 64)  # the digits set; the example is one row of it
    tightfit.compress(
        _model_64(),
        evaluate=lambda m: 1.0,
        constraint=tightfit.MaxDrop(1.0),
        budget=1,
        example_input=big[:1],
        run_dir=tmp_path / "run",
        search="random",
    )
    stored = tmp_path / "run" / "example_input.pt"
    assert stored.stat().st_size < 4096  # 1x64 float32 = 256 bytes of values (the whole set was 460 KB)
    assert torch.equal(torch.load(stored, weights_only=True), big[:1])


def _model_64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_the_lock_file_goes_with_a_clean_finish_and_still_locks_while_held(tmp_path):
    from tightfit.run_dir import RunDir

    run_dir = tmp_path / "run"
    tightfit.compress(_model(), **_arguments(run_dir))
    assert not (run_dir / ".lock").exists()
    with RunDir.open(run_dir):
        assert (run_dir / ".lock").exists()
        with RunDir.open(run_dir):  # re-entrant in the process that holds it
            pass
        assert (run_dir / ".lock").exists()
        with open(run_dir / ".lock") as other, pytest.raises(BlockingIOError):  # another holder is refused
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = []

        def another_thread():
            try:
                with RunDir.open(run_dir):
                    pass
            except ConfigError as exc:
                refused.append(str(exc))

        thread = threading.Thread(target=another_thread)
        thread.start()
        thread.join()
        assert refused and "in use" in refused[0]  # re-entrant in its own thread only
    assert not (run_dir / ".lock").exists()
    # a killed run leaves its .lock behind, unlocked: the next run takes it
    (run_dir / ".lock").write_text("pid 999999")
    with RunDir.open(run_dir):
        assert (run_dir / ".lock").read_text() != "pid 999999"


def test_a_second_holder_of_the_lock_is_refused_with_its_owner(tmp_path):
    from tightfit.run_dir import RunDir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242")
        held.flush()
        with pytest.raises(ConfigError, match="in use by pid 4242"), RunDir.open(run_dir):
            pass


def test_report_shows_the_compressed_flops_that_trials_csv_has(tmp_path):
    run_dir = tmp_path / "run"
    result = tightfit.compress(_model(), **_arguments(run_dir, objective="flops"))
    with open(run_dir / "trials.csv", newline="") as handle:
        rows = {int(r["number"]): r for r in csv.DictReader(handle)}
    flops = int(rows[result.best_trial.number]["flops"])
    shown = CliRunner().invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    line = next(ln for ln in shown.output.splitlines() if "FLOPs (nonzero" in ln)
    assert f"{flops:,}" in line and line.rstrip(" │|").split()[-1] != "-", line
