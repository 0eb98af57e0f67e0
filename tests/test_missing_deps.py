"""A missing optional package is refused before any work, with the pip line; a run whose trials all
fail the same way stops and says so."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError, EvaluationError
from tightfit.search.requirements import SEARCH_REQUIREMENTS, check_requirements


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))


class Counting:
    """A fidelity metric (higher is better) that counts its calls."""

    def __init__(self, reference: nn.Module) -> None:
        with torch.no_grad():
            self.target = reference(X)
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        with torch.no_grad():
            return -float((model(X) - self.target).pow(2).mean())


@pytest.mark.parametrize("search", sorted(SEARCH_REQUIREMENTS))
def test_a_search_method_without_its_package_is_refused_before_any_evaluation(search, monkeypatch, tmp_path):
    (module,) = SEARCH_REQUIREMENTS[search].modules
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as if not installed
    model = _model()
    metric = Counting(model)
    with pytest.raises(ConfigError, match=rf"search='{search}' needs {module}.*pip install 'tightfit\[search\]'"):
        tightfit.compress(model, evaluate=metric, budget=3, search=search, run_dir=tmp_path / "run")
    assert metric.calls == 0 and not (tmp_path / "run").exists()


def test_prune_and_adjust_without_cma_is_refused_before_the_baseline(monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)
    model = _model()
    metric = Counting(model)
    with pytest.raises(ConfigError, match=r"needs cma.*pip install"):
        tightfit.prune_and_adjust(model, evaluate=metric, adjust=lambda m: None, rounds=1, search_budget=3)
    assert metric.calls == 0


def test_an_operator_or_runtime_without_its_package_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ConfigError, match=r"StructuredPrune needs torch_pruning.*tightfit\[speed\]"):
        check_requirements("tpe", tightfit.Compose([tightfit.Prune(), tightfit.StructuredPrune()]))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"runtime='onnxruntime'.*needs onnxruntime"):
        check_requirements("tpe", tightfit.Prune(), tightfit.Latency(X, runtime="onnxruntime"))
    check_requirements("tpe", tightfit.Prune(), tightfit.Latency(X))  # nothing optional asked for
    with pytest.raises(ConfigError, match="`search` must be one of"):
        check_requirements("nonesuch")


def test_installed_packages_pass():
    check_requirements("olmp", tightfit.Compose([tightfit.Prune(), tightfit.Quantize()]))


def test_a_run_whose_trials_all_fail_the_same_way_stops_and_says_so(tmp_path):
    model = _model()
    calls = {"n": 0}

    def broken_after_baseline(m):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("the validation set moved")
        return 1.0

    with pytest.raises(
        EvaluationError, match=r"first 3 trials all failed with the same error.*the validation set moved"
    ):
        tightfit.compress(model, evaluate=broken_after_baseline, budget=20, search="random", run_dir=tmp_path / "run")
    assert calls["n"] == 1 + 3  # the baseline, then three trials; not twenty


def test_failures_after_a_success_or_of_different_kinds_do_not_stop_the_run():
    model = _model()
    metric = Counting(model)
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] in (3, 4, 5, 6):  # trials 2-5 fail alike, after trial 1 succeeded
            raise RuntimeError("flaky disk")
        return metric(m)

    result = tightfit.compress(model, evaluate=flaky, budget=6, search="random", constraint=tightfit.MaxDrop(1.0))
    assert [t.state for t in result.trials].count("FAIL") == 4 and len(result.trials) == 6
