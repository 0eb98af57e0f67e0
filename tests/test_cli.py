import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch.nn.functional as F
from typer.testing import CliRunner

from tightfit.cli.app import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "user_project"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained_project(trained_user_project):
    """The example user project with trained weights (conftest.py: trained once per session)."""
    return trained_user_project


@pytest.fixture
def project(trained_project, tmp_path):
    dest = tmp_path / "proj"
    shutil.copytree(trained_project, dest)
    return dest


def _set(config: Path, **values):
    text = config.read_text()
    for key, value in values.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        text = f"{key} = {value}\n" + "\n".join(lines) + "\n"
    config.write_text(text)


@pytest.mark.slow
def test_run_on_a_user_model_outside_the_package(project):
    config = project / "tightfit.toml"
    _set(config, budget=4)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    run_dir = project / "runs" / "smallnet"
    assert (run_dir / "model.tfz").exists() and (run_dir / "summary.json").exists()
    assert "size ratio" in result.output
    shown = runner.invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0 and "4 trials" in shown.output


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda t: t.replace("budget = 20", "budget = -1"), "budget"),
        (lambda t: t.replace('factory = "my_models:build"', 'factory = "my_models:nope"'), "model.factory"),
        (lambda t: t.replace("max_drop = 0.01", "max_dorp = 0.01"), "constraint.max_dorp"),
        (lambda t: t.replace('operator = "quantize"', 'operator = "quantise"'), "strategy.1.operator"),
        (lambda t: t.replace("bits = [4, 8]", "bits = [1, 8]"), "strategy[1]"),
        (lambda t: t.replace('weights = "weights.pt"', 'weights = "missing.pt"'), "model.weights"),
        (lambda t: t.replace('search = "auto"', 'search = "magic"'), "search"),
        (lambda t: t + "\n[extra]\nx = 1\n", "extra"),
    ],
)
def test_broken_config_exits_nonzero_naming_the_field(project, edit, field):
    config = project / "tightfit.toml"
    config.write_text(edit(config.read_text()))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code != 0
    assert field in result.output
    assert not (project / "runs" / "smallnet" / "study.db").exists()  # rejected before any work


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "none.toml")])
    assert result.exit_code != 0 and "no such config file" in result.output


def _completed(db: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{db}")
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def _count_completed(db: Path) -> int:
    """Read-only count with sqlite3: opening an Optuna storage here could race the run's own
    creation of the schema."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigkilled_run_continues_with_its_completed_trials(project):
    # A slow metric so the kill lands mid-search.
    (project / "slow_metric.py").write_text(
        textwrap.dedent("""
        import time
        import my_models
        from tightfit import Accuracy
        _acc = Accuracy(my_models.val_loader())
        def score(model):
            time.sleep(1.0)
            return _acc(model)
    """)
    )
    config = project / "tightfit.toml"
    text = config.read_text().replace('accuracy = "my_models:val_loader"', 'function = "slow_metric:score"')
    config.write_text(text)
    _set(config, budget=8)
    db = project / "runs" / "smallnet" / "study.db"
    command = [sys.executable, "-m", "tightfit.cli.app", "run", str(config)]
    log = open(project / "first_run.log", "w")  # noqa: SIM115 (the child process writes to it)
    proc = subprocess.Popen(command, cwd=project, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while _count_completed(db) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (project / "first_run.log").read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in _completed(db)}
    assert 3 <= len(before) < 8

    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    after = _completed(db)
    assert len(after) == 8
    assert {t.number: t.params for t in after if t.number in before} == before


@pytest.mark.parametrize(
    "section,expect",
    [
        (
            'method = "gradual"\nepochs = 2\nlr = 0.01\noptions = { ramp = 0.5 }',
            ("GradualPrune", {"ramp": 0.5, "lr": 0.01, "epochs": 2}),
        ),
        ('method = "lc"', ("LearningCompression", {"lr": 0.05, "optimizer": "sgd"})),  # L-C's own defaults
        ('method = "splice"\noptimizer = "sgd"', ("PruneSplice", {"optimizer": "sgd"})),
        ('epochs = 3\ntune = { lr = [1e-4, 1e-2], optimizer = ["adam", "sgd"] }', ("Tuned", {})),
        (
            'options = { loss = "torch.nn.functional:mse_loss" }',
            ("FineTune", {"loss": F.mse_loss}),
        ),  # code by import path
    ],
)
def test_config_chooses_the_recovery_method(project, section, expect):
    from tightfit.cli.config import build_arguments, load_config

    config_path = project / "tightfit.toml"
    text = config_path.read_text()
    head, _, tail = text.partition("[finetune]\n")
    kept = "\n".join(ln for ln in tail.splitlines() if ln.startswith("data ="))
    config_path.write_text(f"{head}[finetune]\n{kept}\n{section}\n")
    config, base = load_config(config_path)
    recovery = build_arguments(config, base, config_path)["finetune"]
    name, attributes = expect
    assert type(recovery).__name__ == name
    for key, value in attributes.items():
        assert getattr(recovery, key) == value
    if name == "Tuned":
        assert sorted(recovery.specs) == ["lr", "optimizer"] and recovery.recovery.epochs == 3


@pytest.mark.parametrize(
    "section,field",
    [
        ('method = "surgery"', "finetune.method"),
        ('method = "gradual"\noptions = { ramp = 2.0 }', "ramp"),
        ('method = "gradual"\noptions = { bogus = 1 }', "bogus"),
        ('method = "sparse"\noptimizer = "adam"', "optimizer"),
        ("tune = { lr = [1e-4] }", "finetune.tune"),
        ('method = "lc"\nweight_decay = 0.1', "finetune.weight_decay"),
        ('options = { loss = "my_models:no_such_loss" }', "finetune.options.loss"),
    ],
)
def test_bad_recovery_config_names_the_field(project, section, field):
    config_path = project / "tightfit.toml"
    head, _, tail = config_path.read_text().partition("[finetune]\n")
    kept = "\n".join(ln for ln in tail.splitlines() if ln.startswith("data ="))
    config_path.write_text(f"{head}[finetune]\n{kept}\n{section}\n")
    result = runner.invoke(app, ["run", str(config_path)])
    assert result.exit_code != 0 and field in result.output, result.output


def _prune_adjust_config(config: Path) -> None:
    text = config.read_text()
    text = text.replace('[[strategy]]\noperator = "quantize"\nbits = [4, 8]\n', "")  # rounds may only prune
    text = text.replace("epochs = 3", 'epochs = 1\nmethod = "gradual"')
    config.write_text(text + '\n[prune_adjust]\nrounds = 2\nstep = 0.3\nsearch = "random"\nsearch_budget = 4\n')


def test_prune_adjust_runs_rounds_from_the_config_and_resumes(project):
    config = project / "tightfit.toml"
    _prune_adjust_config(config)
    result = runner.invoke(app, ["prune-adjust", str(config)])
    assert result.exit_code == 0, result.output
    run_dir = project / "runs" / "smallnet" / "prune-adjust"
    assert "round 1:" in result.output and "round 2:" in result.output
    assert (run_dir / "rounds.json").exists() and (run_dir / "round-01" / "study.db").exists()
    again = runner.invoke(app, ["prune-adjust", str(config)])  # finished: shows the stored rounds, trains nothing
    assert again.exit_code == 0, again.output
    assert again.output.count("round 1:") == 1 and "nonzero-weight ratio" in again.output
    shown = runner.invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "round 2:" in shown.output and "nonzero-weight ratio" in shown.output


def test_prune_adjust_names_what_its_config_lacks(project):
    config = project / "tightfit.toml"
    _prune_adjust_config(config)
    text = config.read_text()
    no_finetune = text[: text.index("[finetune]")] + text[text.index("[prune_adjust]") :]
    config.write_text(no_finetune)
    result = runner.invoke(app, ["prune-adjust", str(config)])
    assert result.exit_code != 0 and "[finetune]" in result.output
    config.write_text(text.replace("max_drop = 0.01", "min_metric = 0.5"))
    result = runner.invoke(app, ["prune-adjust", str(config)])
    assert result.exit_code != 0 and "max_drop" in result.output
    config.write_text(text.replace('search = "random"', 'search = "magic"'))
    result = runner.invoke(app, ["prune-adjust", str(config)])
    assert result.exit_code != 0 and "prune_adjust.search" in result.output


@pytest.mark.slow
def test_config_turns_on_cheap_evaluation_with_its_options(project):
    config = project / "tightfit.toml"
    _set(config, budget=6, search='"random"')
    config.write_text(
        config.read_text()
        + textwrap.dedent("""
        [evaluation]
        method = "sequential"
        min_improvement = 0.05
        promote_probability = 0.6
        probe_samples = 32
    """)
    )
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    db = project / "runs" / "smallnet" / "study.db"
    trials = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{db}").get_trials()
    assert len(trials) == 6 and all("fidelity" in t.user_attrs for t in trials)  # evaluated sequentially
    evaluation = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{db}").user_attrs["tightfit.settings"][
        "evaluation"
    ]
    assert evaluation["method"] == "sequential" and evaluation["min_improvement"] == 0.05
    assert evaluation["promote_probability"] == 0.6 and evaluation["probe_samples"] == 32
    # an option out of range is refused before any work, naming the field
    config.write_text(config.read_text().replace("promote_probability = 0.6", "promote_probability = 1.5"))
    bad = runner.invoke(app, ["run", str(config)])
    assert bad.exit_code == 2 and "promote_probability" in bad.output


def test_config_passes_an_accuracy_threshold_and_rejects_one_without_accuracy(project):
    from tightfit.cli.config import build_arguments, load_config

    config_path = project / "tightfit.toml"
    text = config_path.read_text()
    config_path.write_text(text.replace("[evaluate]\n", "[evaluate]\nthreshold = 0.0\n", 1))
    config, base = load_config(config_path)
    assert build_arguments(config, base, config_path)["evaluate"].threshold == 0.0
    config_path.write_text(
        text.replace("[evaluate]\n", '[evaluate]\nthreshold = 0.5\nfunction = "my_models:build"\n', 1).replace(
            'accuracy = "', '# accuracy = "', 1
        )
    )
    result = runner.invoke(app, ["run", str(config_path)])
    assert result.exit_code != 0 and "threshold" in result.output
