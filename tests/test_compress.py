import csv
import json
import math

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError, ModelError
from tightfit.operators import Compose, Prune, Quantize


def _args(digits, **overrides):
    args = dict(
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Compose([Prune(sparsity=(0.0, 0.9)), Quantize(bits=(4, 8))]),
        constraint=tightfit.MaxDrop(0.02),
        finetune=tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3),
        budget=6,
        search="tpe",
        example_input=digits.x_val[:1],
        seed=0,
    )
    args.update(overrides)
    return args


def test_short_search_end_to_end(mlp, digits, tmp_path):
    original = {k: v.clone() for k, v in mlp.state_dict().items()}
    run_dir = tmp_path / "run"
    result = tightfit.compress(mlp, **_args(digits), run_dir=run_dir)

    # the user's model is untouched
    assert all(torch.equal(original[k], v) for k, v in mlp.state_dict().items())
    assert len(result.trials) == 6 and all(t.state == "COMPLETE" for t in result.trials)
    assert result.feasible and result.best_trial is not None
    assert result.baseline_metric - result.metric <= 0.02
    assert result.compression_ratio == pytest.approx(result.baseline_size_bytes / result.size_bytes)
    assert result.compression_ratio > 1.5
    assert result.nonzero_ratio >= 1.0
    # the file on disk is the reported size, and loading it reproduces the reported metric exactly
    model_file = run_dir / "model.tfz"
    assert model_file.stat().st_size == result.size_bytes
    loaded = tightfit.load(model_file)
    assert tightfit.Accuracy(digits.loader("val", 512))(loaded) == result.metric
    assert result.metric == result.best_trial.measurement.metric
    # the plan reproduces the compressed structure on a fresh copy
    again = tightfit.apply(result.plan, mlp)
    assert [int((m.weight == 0).sum()) for m in (again[1], again[3], again[5])] == [
        int((m.weight == 0).sum()) for m in (loaded[1], loaded[3], loaded[5])
    ]
    # run directory contents
    for name in ("study.db", "summary.json", "trials.csv", "trials.png", "model.tfz"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["size_bytes"] == result.size_bytes and summary["best_trial"] == result.best_trial.number
    with open(run_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    # the Pareto front is non-dominated and sorted by size
    sizes = [t.measurement.size_bytes for t in result.pareto]
    metrics = [t.measurement.metric for t in result.pareto]
    assert sizes == sorted(sizes) and metrics == sorted(metrics)
    # FLOPs were counted with the example input, nonzero weights only
    assert result.best_trial.measurement.flops < result.baseline.flops


@pytest.mark.slow
def test_rerun_resumes_with_completed_trials_intact(mlp, digits, tmp_path):
    run_dir = tmp_path / "run"
    first = tightfit.compress(mlp, **_args(digits, budget=3), run_dir=run_dir)
    second = tightfit.compress(mlp, **_args(digits, budget=5), run_dir=run_dir)
    assert [t.number for t in second.trials] == [0, 1, 2, 3, 4]
    for a, b in zip(first.trials, second.trials[:3]):
        assert a.plan == b.plan and a.measurement == b.measurement


@pytest.mark.slow
def test_resumed_search_suggests_what_an_uninterrupted_one_would(mlp, digits, tmp_path):
    whole = tightfit.compress(mlp, **_args(digits, budget=5), run_dir=tmp_path / "whole")
    tightfit.compress(mlp, **_args(digits, budget=2), run_dir=tmp_path / "split")
    split = tightfit.compress(mlp, **_args(digits, budget=5), run_dir=tmp_path / "split")
    assert [t.plan for t in whole.trials] == [t.plan for t in split.trials]


def test_resume_with_other_settings_is_refused(mlp, digits, tmp_path):
    tightfit.compress(mlp, **_args(digits, budget=1), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="objective"):
        tightfit.compress(mlp, **_args(digits, budget=2, objective="nonzeros"), run_dir=tmp_path / "run")


def test_failing_and_nan_evaluations_are_recorded_and_the_search_goes_on(mlp, digits):
    accuracy = tightfit.Accuracy(digits.loader("val", 512))
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        if calls["n"] == 4:
            return float("nan")
        return accuracy(model)

    result = tightfit.compress(mlp, **_args(digits, evaluate=flaky, budget=6, finetune=None))
    states = [t.state for t in result.trials]
    assert states.count("FAIL") == 2 and states.count("COMPLETE") == 4
    errors = [t.error for t in result.trials if t.state == "FAIL"]
    assert any("disk on fire" in e for e in errors) and any("finite" in e for e in errors)
    assert result.feasible


def test_baseline_evaluation_failure_is_an_error_before_the_search(mlp, digits):
    def broken(model):
        raise ValueError("bad metric")

    # said to be the original's evaluation (the CLI prints it without a traceback), the cause chained
    with pytest.raises(tightfit.errors.EvaluationError, match="raised ValueError: bad metric.*original") as caught:
        tightfit.compress(mlp, **_args(digits, evaluate=broken))
    assert isinstance(caught.value.__cause__, ValueError)


def test_nothing_feasible_returns_the_original_and_says_so(mlp, digits):
    result = tightfit.compress(
        mlp,
        **_args(
            digits, strategy=Compose([Prune(sparsity=0.999)]), constraint=tightfit.MaxDrop(0.0), finetune=None, budget=2
        ),
    )
    assert not result.feasible and result.plan is None
    assert "No feasible plan" in result.message
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), mlp.state_dict().values()))


def test_model_without_compressible_layers_is_a_clear_error(digits):
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))
    with pytest.raises(ModelError, match="Linear/Conv"):
        tightfit.compress(model, evaluate=lambda m: 1.0, budget=1)


def test_a_strategy_that_takes_no_layer_says_why_for_each(digits):
    # the error used to end in "Left alone: []" when every weight layer was refused or left out
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2))
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(
        ModelError, match=r"Its weight layers and why: 0: int8 does not compress a Conv2d layer; 2: "
    ) as error:
        tightfit.compress(model, evaluate=lambda m: 1.0, example_input=x, budget=1, strategy=tightfit.Int8())
    assert "Left alone" not in str(error.value)
    with pytest.raises(ModelError, match=r"0: left out by the operators' `layers` patterns"):
        tightfit.compress(model, evaluate=lambda m: 1.0, example_input=x, budget=1, strategy=Prune(layers=["head*"]))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"budget": 0}, "budget"),
        ({"objective": "speed"}, "objective"),
        ({"search": "magic"}, "search"),
        ({"objective": "flops", "example_input": None}, "example_input"),
        ({"constraint": 0.5}, "constraint"),
        ({"strategy": "prune"}, "strategy"),
        ({"evaluate": 3}, "evaluate"),
    ],
)
def test_bad_arguments_name_the_field(mlp, digits, overrides, field):
    with pytest.raises(ConfigError, match=field):
        tightfit.compress(mlp, **_args(digits, **overrides))


def test_objectives_nonzeros_and_flops(mlp, digits):
    for objective in ("nonzeros", "flops"):
        result = tightfit.compress(mlp, **_args(digits, objective=objective, budget=3, finetune=None))
        best = result.best_trial
        expected = best.measurement.nonzeros if objective == "nonzeros" else best.measurement.flops
        assert best.objective == expected
        assert not math.isnan(best.objective)


def test_ctrl_c_loses_only_the_running_trial_and_a_rerun_retries_it(mlp, digits, tmp_path):
    accuracy = tightfit.Accuracy(digits.loader("val", 512))
    calls = {"n": 0}

    def interrupted_once(model):
        calls["n"] += 1
        if calls["n"] == 4:  # the baseline is call 1, so the third trial is interrupted
            raise KeyboardInterrupt
        return accuracy(model)

    args = _args(digits, evaluate=interrupted_once, budget=5, finetune=None)
    with pytest.raises(KeyboardInterrupt):
        tightfit.compress(mlp, **args, run_dir=tmp_path / "run")
    result = tightfit.compress(mlp, **args, run_dir=tmp_path / "run")
    states = [t.state for t in result.trials]
    assert states.count("COMPLETE") == 5
    interrupted = [t for t in result.trials if t.error == "interrupted"]
    assert len(interrupted) == 1
    # the interrupted point was evaluated again, not skipped
    retried = [t for t in result.trials if t.state == "COMPLETE" and t.number > interrupted[0].number]
    assert retried and retried[0].plan is not None
    uninterrupted = tightfit.compress(mlp, **_args(digits, budget=5, finetune=None))
    assert [t.plan for t in result.trials if t.state == "COMPLETE"] == [t.plan for t in uninterrupted.trials]


def test_an_example_input_the_model_rejects_only_disables_flops(mlp, digits):
    wrong = torch.zeros(1, 7)
    result = tightfit.compress(mlp, **_args(digits, example_input=wrong, budget=2, finetune=None))
    assert all(t.state == "COMPLETE" and t.measurement.flops is None for t in result.trials)
    with pytest.raises(ConfigError, match="example_input"):
        tightfit.compress(mlp, **_args(digits, example_input=wrong, objective="flops", budget=1))


def test_a_model_that_cannot_be_copied_is_a_clear_error(digits):
    import threading

    model = nn.Sequential(nn.Linear(64, 10))
    model.lock = threading.Lock()
    with pytest.raises(ModelError, match="copied"):
        tightfit.compress(model, evaluate=lambda m: 1.0, budget=1)


def test_importing_the_pipeline_never_shadows_the_function():
    import importlib

    importlib.import_module("tightfit.demo.run")
    importlib.import_module("tightfit.pipeline")
    assert callable(tightfit.compress) and tightfit.compress.__name__ == "compress"


def test_direction_check_reads_a_constant_metric_as_no_trend_without_a_warning():
    # scipy's spearmanr warns (ConstantInputWarning) when every trial scored the same, as a coarse
    # accuracy often does; that warning reached the user's run.
    import warnings

    from tightfit.run.notes import spearman

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spearman([(1.0, 0.5), (2.0, 0.5), (3.0, 0.5), (4.0, 0.5)]) == 0.0
        assert spearman([(1.0, 0.4), (2.0, 0.3), (3.0, 0.2), (4.0, 0.1)]) == pytest.approx(-1.0)


def test_a_compiled_model_is_compressed_through_what_it_wraps_and_a_scripted_one_is_refused(digits):
    # a torch.compile wrapper gave a "compressed" file 3x the original's; a ScriptModule a raw RuntimeError
    mlp = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    result = tightfit.compress(torch.compile(mlp), **_args(digits, budget=2, finetune=None))
    assert isinstance(result.model, nn.Sequential) and result.compression_ratio > 1.0
    assert any("torch.compile" in note for note in result.notes)
    with pytest.raises(ConfigError, match="TorchScript module"):
        tightfit.compress(torch.jit.script(mlp), **_args(digits, budget=2, finetune=None))


def test_a_weight_normed_layer_is_folded_and_compressed(digits, tmp_path):
    # weight_norm's parametrization over two tensors crashed the analysis ("no attribute 'original'")
    import copy

    from torch.nn.utils.parametrizations import weight_norm

    from tightfit.operators.plan import fold_weight_norm

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    weight_norm(mlp[0])
    plain = copy.deepcopy(mlp)
    assert fold_weight_norm(plain) == ["0"] and not torch.nn.utils.parametrize.is_parametrized(plain[0])
    with torch.no_grad():
        assert torch.allclose(plain(digits.x_val), mlp(digits.x_val), atol=1e-6)  # it computes the same
    result = tightfit.compress(mlp, **_args(digits, budget=2, finetune=None, run_dir=tmp_path / "run"))
    assert result.compression_ratio > 1.0 and not any(s.name == "0" for s in result.left_alone)
    assert any("Weight norm was folded" in note for note in result.notes)
    assert torch.nn.utils.parametrize.is_parametrized(mlp[0])  # the user's model is unchanged
    assert tightfit.apply(result.plan, mlp)(digits.x_val[:4]).shape == (4, 10)  # a plan replays on it too
    loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=mlp)  # and its file loads into it
    with torch.no_grad():
        assert torch.equal(loaded(digits.x_val[:4]), result.model(digits.x_val[:4]))


def test_a_device_this_machine_lacks_is_a_config_error(digits):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"Accuracy: `device` is 'cuda'.*device='cpu'"):
        tightfit.Accuracy(digits.loader("val", 512), device="cuda")
    with pytest.raises(ConfigError, match=r"FineTune: `device` must be a torch device"):
        tightfit.FineTune(digits.loader("train"), device="gpu0")
