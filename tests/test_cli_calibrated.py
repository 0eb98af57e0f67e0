"""The command line's calibration, metric objective, resource budgets, recovery after the search and
`tightfit compress-once` (issue 17's API through the config file), on the digits example project."""

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from tightfit.cli.app import app

runner = CliRunner()

HEAD = """seed = 0
run_dir = "runs/cal"
example_input = "my_models:example_input"

[model]
factory = "my_models:build"
weights = "weights.pt"

[evaluate]
accuracy = "my_models:val_loader"
"""


@pytest.fixture
def project(trained_user_project, tmp_path):
    dest = tmp_path / "proj"
    shutil.copytree(trained_user_project, dest)
    return dest


def _write(project: Path, body: str, head: str = HEAD) -> Path:
    """HEAD + body, the body's top-level keys (before its first [table]) moved above HEAD's tables."""
    lines = body.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    config = project / "cal.toml"
    config.write_text("".join(lines[:first]) + head + "".join(lines[first:]))
    return config


GPTQ_METRIC = """objective = "metric"
budget = 2
search = "random"

[[strategy]]
operator = "quantize"
bits = [3, 4]
method = "gptq"
group_size = [0, 32]

[constraint]
max_bits = 6

[calibration]
samples = 64

[recover]
data = "my_models:train_loader"
epochs = 1
top = 2
"""


@pytest.mark.parametrize(
    "body,field",
    [
        # a bad operator keyword names its [[strategy]] entry and key
        (
            '[[strategy]]\noperator = "quantize"\nbits = 4\ngroup_size = 1\n[constraint]\nmax_drop = 0.01\n',
            "strategy[0].group_size",
        ),
        ('[[strategy]]\noperator = "prune"\npattern = "4:2"\n[constraint]\nmax_drop = 0.01\n', "strategy[0].pattern"),
        ('[[strategy]]\noperator = "prune"\nmethod = "obs"\n[constraint]\nmax_drop = 0.01\n', "strategy[0].method"),
        # the metric objective needs a resource budget, and a search that can maximize it
        ('objective = "metric"\n[[strategy]]\noperator = "quantize"\n[constraint]\nmax_drop = 0.01\n', "max_bits"),
        (
            'objective = "metric"\nsearch = "bo"\n[[strategy]]\noperator = "quantize"\n[constraint]\nmax_bits = 4\n',
            "search",
        ),
        ('[[strategy]]\noperator = "quantize"\n[constraint]\nmax_bits = 0\n', "constraint.max_bits"),
        # calibrated operators need [calibration]; [calibration] nothing in a search uses is refused
        ('[[strategy]]\noperator = "quantize"\nmethod = "gptq"\n[constraint]\nmax_drop = 0.01\n', "calibration"),
        (
            '[[strategy]]\noperator = "quantize"\n[constraint]\nmax_drop = 0.01\n'
            '[calibration]\nloader = "my_models:train_loader"\n',
            "calibration",
        ),
        (
            '[[strategy]]\noperator = "prune"\nmethod = "wanda"\n[constraint]\nmax_drop = 0.01\n[calibration]\nsamples = 64\n',
            "calibration",
        ),  # samples of which training data? no [finetune] / [recover] data
        (
            '[[strategy]]\noperator = "prune"\nmethod = "wanda"\n[constraint]\nmax_drop = 0.01\n'
            '[calibration]\nloader = "my_models:train_loader"\nsamples = 0\n',
            "calibration.samples",
        ),
        (
            '[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 0.01\n'
            '[recover]\ndata = "my_models:train_loader"\ntune = { lr = [1e-4, 1e-2] }\n',
            "recover.tune",
        ),
        (
            '[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 0.01\n'
            '[recover]\ndata = "my_models:train_loader"\nmethod = "lc"\nweight_decay = 0.1\n',
            "recover.weight_decay",
        ),
        (
            '[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 0.01\n[recover]\ndata = "my_models:nope"\n',
            "recover.data",
        ),
    ],
)
def test_bad_new_settings_are_refused_naming_the_field_before_any_work(project, body, field):
    config = _write(project, body)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert field in result.output, result.output
    assert not (project / "runs").exists()  # no run directory, no study


def test_max_flops_needs_an_example_input(project):
    body = '[[strategy]]\noperator = "prune"\n[constraint]\nmax_flops = 1000\n'
    result = runner.invoke(
        app, ["run", str(_write(project, body, HEAD.replace("example_input =", "# example_input =")))]
    )
    assert result.exit_code == 2 and "constraint.max_flops" in result.output, result.output


def test_compress_checks_its_arguments_before_the_run_directory_is_made(project):
    # what only tightfit.compress's own checks see (here: a FLOPs objective without an example input)
    # is refused before `run` makes the run directory and its study
    body = 'objective = "flops"\n[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 0.01\n'
    config = _write(project, body, HEAD.replace("example_input =", "# example_input ="))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2 and "example_input" in result.output, result.output
    assert not (project / "runs").exists()


def test_config_builds_the_new_constraints_recovery_and_calibration(project):
    from tightfit.cli.config import build_arguments, load_config
    from tightfit.evaluation import MaxBits, MaxFlops
    from tightfit.run.settings import describe_calibration

    body = GPTQ_METRIC.replace("max_bits = 6", "max_bits = 6\nmax_flops = 20000")
    config_path = _write(project, body)
    config, base = load_config(config_path)
    first = build_arguments(config, base, config_path)
    kinds = {type(c) for c in first["constraint"]}
    assert kinds == {MaxBits, MaxFlops} and first["objective"] == "metric"
    assert type(first["recover"]).__name__ == "FineTune" and first["recover"].epochs == 1
    assert first["recover_top"] == 2 and first["finetune"] is None
    op = first["strategy"].operators[0]
    assert (op.method, op.group_sizes, op.bits) == ("gptq", (0, 32), (3, 4))
    # 64 samples of the shuffled training loader, drawn with the run's seed: the same ones again
    # (a resume or a worker is refused when the digest differs)
    assert sum(len(b) for b in first["calibration"]) == 64
    second = build_arguments(config, base, config_path)
    assert describe_calibration(first["calibration"]) == describe_calibration(second["calibration"])
    config_path.write_text(config_path.read_text().replace("seed = 0", "seed = 1"))
    config, base = load_config(config_path)
    other = build_arguments(config, base, config_path)
    assert describe_calibration(other["calibration"]) != describe_calibration(first["calibration"])


def test_calibrated_metric_run_with_recovery_stores_the_digest_and_shows_before_and_after(project):
    from tightfit.cli.config import build_arguments, load_config
    from tightfit.run.settings import describe_calibration

    config_path = _write(project, GPTQ_METRIC)
    result = runner.invoke(app, ["run", str(config_path)])
    assert result.exit_code == 0, result.output
    run_dir = project / "runs" / "cal"
    db = run_dir / "study.db"
    settings = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{db}").user_attrs["tightfit.settings"]
    config, base = load_config(config_path)
    expected = describe_calibration(build_arguments(config, base, config_path)["calibration"])
    assert settings["calibration"] == expected and settings["objective"] == "metric"
    assert settings["constraints"] == ["MaxBits(6)"]
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["metric_before_recovery"], summary["metric"]
    assert before is not None and summary["recovery"]["trials"]
    # the table shows the answer's metric before and after its recovery, as summary.json holds them
    assert f"{before:.4f}" in result.output and f"{after:.4f}" in result.output
    assert "before recovery" in result.output and "after recovery" in result.output
    assert "recovery after the search" in result.output  # the table of recovered plans
    shown = runner.invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert expected in shown.output and "before recovery" in shown.output and f"{after:.4f}" in shown.output
    # a resume with other calibration data is refused, naming it
    config_path.write_text(config_path.read_text().replace("samples = 64", "samples = 32"))
    again = runner.invoke(app, ["run", str(config_path)])
    assert again.exit_code == 2 and "calibration" in again.output, again.output


ONCE = """[[strategy]]
operator = "quantize"
bits = 4
method = "gptq"
group_size = 32

[constraint]
max_bits = 6
max_drop = 0.05

[calibration]
loader = "my_models:train_loader"
samples = 64

[compress_once]
repair = ["bias"]
"""


def test_compress_once_writes_a_model_whose_metric_and_bytes_it_reports(project):
    import tightfit
    from tightfit.evaluation import Accuracy

    result = runner.invoke(app, ["compress-once", str(_write(project, ONCE))])
    assert result.exit_code == 0, result.output
    import my_models  # importable now: the config's folder joined the import path

    out = project / "runs" / "cal" / "compress-once"
    once = json.loads((out / "once.json").read_text())
    assert (out / "model.tfz").stat().st_size == once["size_bytes"]
    assert once["bits_per_weight"] <= 6 and once["calibration"].startswith("1 batches, sha256 ")
    assert "bias" in once["repaired"] and once["calibration_passes"] >= 3
    assert [c[0] for c in once["constraints"]] == ["MaxDrop(0.05)", "MaxBits(6)"]
    # the file read back scores what was reported
    loaded = tightfit.load(out / "model.tfz", model=my_models.build())
    assert Accuracy(my_models.val_loader())(loaded) == pytest.approx(once["metric"], abs=1e-9)
    assert f"{once['metric']:.4f}" in result.output and "MaxBits(6): met" in result.output
    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and once["calibration"] in shown.output, shown.output
    assert torch.load(out / "example_input.pt", weights_only=True).shape[-1] == 64  # for `tightfit export`


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda t: t.replace("bits = 4", "bits = [4, 8]"), "ranges or choices"),
        (lambda t: t.replace('repair = ["bias"]', 'repair = ["bn"]'), "compress_once.repair"),
        (lambda t: t.replace("max_bits = 6", "max_latency_ms = 1"), "constraint.max_latency_ms"),
        (lambda t: t[: t.index("[calibration]")] + '[compress_once]\nrepair = ["bias"]\n', "calibration"),
        (lambda t: t.replace('method = "gptq"', 'method = "gptq"\ntarget = "model"'), "`target`"),
    ],
)
def test_compress_once_refuses_bad_settings_naming_them(project, edit, field):
    result = runner.invoke(app, ["compress-once", str(_write(project, edit(ONCE)))])
    assert result.exit_code == 2 and field in result.output, result.output
    assert not (project / "runs" / "cal" / "compress-once" / "model.tfz").exists()


def test_report_of_a_compress_once_directory_shows_stored_text_as_data(tmp_path):
    from tightfit.cli.once import ONCE_FILE

    run_dir = tmp_path / "compress-once"
    run_dir.mkdir()
    once = {
        "baseline_metric": 0.9,
        "metric": 0.85,
        "baseline_size_bytes": 1000,
        "size_bytes": 200,
        "weight_params": 400,
        "nonzeros": 400,
        "bits_per_weight": 4.0,
        "constraints": [["MaxBits([red]5)", 0.1, False]],
        "calibration": "[bold]x\x1b[31m",
        "uncalibrated": {},
        "not_fitted": {"[red]a.0": "a structural operator changed it"},
    }
    (run_dir / ONCE_FILE).write_text(json.dumps(once))
    shown = runner.invoke(app, ["report", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "[bold]x" in shown.output and "\x1b" not in shown.output  # no markup, no terminal control
    assert "MaxBits([red]5): not met" in shown.output and "constraints not met" in shown.output
    assert "not fitted to the original [red]a.0: a structural operator changed it" in shown.output
    (run_dir / ONCE_FILE).write_text('{"metric": "high"}')
    broken = runner.invoke(app, ["report", str(run_dir)])
    assert broken.exit_code == 2 and ONCE_FILE in broken.output, broken.output


def test_calibration_inputs_are_used_as_given_and_a_lone_tensor_is_refused(project):
    from tightfit.cli.config import build_arguments, load_config

    (project / "calib_data.py").write_text(
        "import torch\n"
        "def batches():\n    return [torch.ones(3, 64), torch.zeros(2, 64)]\n"
        "def one_tensor():\n    return torch.ones(3, 64)\n"
    )
    body = GPTQ_METRIC.replace("samples = 64", 'inputs = "calib_data:batches"')
    config_path = _write(project, body)
    config, base = load_config(config_path)
    batches = build_arguments(config, base, config_path)["calibration"]
    assert [b.sum().item() for b in batches] == [192.0, 0.0]  # in order, untouched
    config_path.write_text(config_path.read_text().replace("calib_data:batches", "calib_data:one_tensor"))
    result = runner.invoke(app, ["run", str(config_path)])
    assert result.exit_code == 2 and "calibration.inputs" in result.output, result.output
    assert not (project / "runs").exists()
