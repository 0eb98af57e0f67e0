"""Small faults found by trying tightfit as a new user would (issue 16, item 9), one test each."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

import tightfit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


def _fidelity(reference: nn.Module):
    with torch.no_grad():
        target = reference(X)

    def metric(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(X) - target).pow(2).mean())

    return metric


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in tightfit catches it, so the trial stays RUNNING."""


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_a_trial_killed_between_two_suggest_calls_is_retried_with_the_same_plan(search, tmp_path, monkeypatch):
    model = _model()
    args = dict(evaluate=_fidelity(model), budget=4, search=search, constraint=tightfit.MaxDrop(1.0), seed=0)
    whole = tightfit.compress(model, **args, run_dir=tmp_path / "whole")
    real = optuna.trial.Trial.suggest_float
    calls = {"n": 0}

    def killed_on_the_sixth_draw(self, *a, **k):  # trial 2, after its first layer's values (two floats a trial)
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Killed
        return real(self, *a, **k)

    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", killed_on_the_sixth_draw)
    with pytest.raises(_Killed):
        tightfit.compress(model, **args, run_dir=tmp_path / "split")
    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", real)
    resumed = tightfit.compress(model, **args, run_dir=tmp_path / "split")
    assert [t.error for t in resumed.trials].count("interrupted") == 1
    completed = [t.plan for t in resumed.trials if t.state == "COMPLETE"]
    assert completed == [t.plan for t in whole.trials]  # before: trial 2's second layer drew other values


def test_an_empty_training_loader_warns_and_the_result_says_so():
    model = _model()
    empty = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    )
    with pytest.warns(RuntimeWarning, match="holds no batch"):
        finetune = tightfit.FineTune(empty, epochs=1)
    with pytest.warns(RuntimeWarning, match="holds no batch"):
        tightfit.FineTune(iter_again(), epochs=1)  # unsized, and empty
    result = tightfit.compress(
        model, evaluate=_fidelity(model), budget=1, finetune=finetune, constraint=tightfit.MaxDrop(1.0), search="random"
    )
    assert any("held no batch" in note and "no trial was fine-tuned" in note for note in result.notes)
    full = tightfit.compress(
        model,
        evaluate=_fidelity(model),
        budget=1,
        constraint=tightfit.MaxDrop(1.0),
        search="random",
        finetune=tightfit.FineTune([(X[:8], torch.zeros(8, dtype=torch.long))], epochs=1),
    )
    assert not any("held no batch" in note for note in full.notes)


class iter_again:  # noqa: N801 - a re-iterable with no __len__ that yields nothing
    def __iter__(self):
        return iter(())


def test_a_max_drop_wider_than_the_metric_warns_naming_the_field():
    from tightfit.evaluation.constraints import MaxDrop, check_max_drop

    class Fraction:
        value_range = (0.0, 1.0)

    with pytest.warns(UserWarning, match=r"MaxDrop\(2\): `max_drop` lets the metric fall to -1.1.*range \[0, 1\]"):
        assert check_max_drop([MaxDrop(2)], Fraction(), 0.9)
    with pytest.warns(UserWarning, match=r"MaxDrop\(2\): `max_drop` is 2 while the original's metric is 0.9"):
        check_max_drop([MaxDrop(2)], lambda m: 0.9, 0.9)  # range unknown, value in [0, 1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_max_drop([MaxDrop(0.02)], Fraction(), 0.9) is None
        assert check_max_drop([MaxDrop(2)], lambda m: -3.2, -3.2) is None  # a negative loss: its scale is its own
    # through compress: the warning comes once the original's metric is known
    model = _model()
    with pytest.warns(UserWarning, match="MaxDrop"):
        tightfit.compress(model, evaluate=lambda m: 0.9, budget=1, constraint=tightfit.MaxDrop(2), search="random")


def test_export_with_an_unknown_format_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from tightfit.cli.app import app

    out = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "xyz"])
    assert out.exit_code == 2 and "Traceback" not in out.output  # before: a KeyError traceback, exit code 1
    assert "`format` must be one of onnx, torchscript, but got 'xyz'" in out.output


_PROJECT = {
    "proj.toml": 'budget = 1\nsearch = "random"\n[model]\nfactory = "proj_model:build"\n'
    '[evaluate]\nfunction = "proj_model:{metric}"\n[[strategy]]\noperator = "prune"\nsparsity = [0.0, 0.5]\n'
    "[constraint]\nmax_drop = 0.5\n",
    "proj_model.py": "import torch\nfrom torch import nn\n\n"
    "def build():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n\n"
    "def broken(model):\n    raise KeyError('labels')\n\n"
    "def constant(model):\n    return 1.0\n",
}


def _project(tmp_path, metric: str):
    for name, text in _PROJECT.items():
        (tmp_path / name).write_text(text.replace("{metric}", metric))
    return tmp_path / "proj.toml"


def test_an_evaluate_that_raises_on_the_original_is_named_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from tightfit.cli.app import app

    config = _project(tmp_path, "broken")
    out = CliRunner().invoke(app, ["run", str(config)])
    assert out.exit_code == 2 and "Traceback" not in out.output
    text = " ".join(out.output.split())
    assert "`evaluate` raised KeyError: 'labels'" in text and "original, uncompressed model" in text
    assert "proj_model.py" in text  # where it was raised


def test_a_file_beside_the_config_named_like_a_dependency_does_not_shadow_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = _project(tmp_path, "constant")
    (tmp_path / "matplotlib.py").write_text("raise ImportError('the local matplotlib.py was imported')\n")
    src = str(Path(tightfit.__file__).parents[1])
    code = (
        "import sys; from tightfit.cli.config import load_config, resolve_import; "
        f"load_config({str(config)!r}); import matplotlib; print(matplotlib.__file__); "
        "print(resolve_import('proj_model:build').__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    matplotlib_file, module = done.stdout.split()
    assert (
        Path(matplotlib_file).parent.name == "matplotlib" and module == "proj_model"
    )  # the real one; the config's module


def test_a_layer_pruned_to_nothing_is_named_and_the_figure_is_honest():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    result = tightfit.compress(
        model,
        evaluate=lambda m: 1.0,
        budget=1,
        strategy=tightfit.Prune(sparsity=0.99),
        constraint=tightfit.MaxDrop(1.0),
        search="random",
    )
    (note,) = [n for n in result.notes if "no nonzero weight left" in n]
    assert "Layer(s) 2, 4" in note and "164.0x fewer nonzero weights (1 of 164 left)" in note
    single = nn.Sequential(nn.Linear(8, 4)).eval()  # every weight zero: not "32.0x" (32 / max(1, 0))
    result = tightfit.compress(
        single,
        evaluate=lambda m: 1.0,
        budget=1,
        strategy=tightfit.Prune(sparsity=0.99),
        constraint=tightfit.MaxDrop(1.0),
        search="random",
    )
    assert "no nonzero weight left" in result.message and "x fewer nonzero" not in result.message
