"""Full evaluation stores a trial's ``metric_se`` as the standard error of its drop from the
original, paired over the same validation samples (``run.measuring.OriginalValues``)."""

import math

import pytest
import torch
from torch import nn

import tightfit
from tightfit.evaluation.constraints import MaxDrop, MinMetric
from tightfit.operators import Compose, Prune, Quantize
from tightfit.run.measuring import OriginalValues


class FixedValues:
    """A per-sample metric whose values are given per model (by the model's ``tag``)."""

    value_range = (0.0, 1.0)

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table
        self.num_samples = len(next(iter(table.values())))
        self.samples_evaluated = 0

    def per_sample(self, model, indices=None):
        self.samples_evaluated += self.num_samples
        return self.table[model.tag].clone()

    def __call__(self, model):
        return float(self.per_sample(model).mean())


def _tagged(tag: str) -> nn.Module:
    module = nn.Linear(1, 1)
    module.tag = tag
    return module


def _metric(n: int = 2000, flips: int = 40):
    original = (torch.arange(n) % 10 != 0).double()  # 90% correct
    candidate = original.clone()
    candidate[:flips] = 1 - candidate[:flips]  # disagrees with the original on `flips` samples only
    return FixedValues({"original": original, "candidate": candidate}), original, candidate


def test_drop_standard_error_is_paired_and_much_smaller_than_the_metric_s():
    metric, original, candidate = _metric()
    values, baseline = OriginalValues.read(metric, _tagged("original"), [MaxDrop(0.01)])
    assert baseline == float(original.mean())
    value, se = values.metric(metric, _tagged("candidate"))
    assert value == float(candidate.mean())
    diff = original - candidate
    assert se == pytest.approx(float(diff.std() / math.sqrt(len(diff))), rel=0.05)  # floored by 2 pseudo-samples
    unpaired = float(candidate.std() / math.sqrt(len(candidate)))
    assert se < unpaired / 2  # 40 disagreements of 2,000: 0.0032 against the metric's 0.0066


def test_a_plan_identical_to_the_original_keeps_a_positive_noise():
    metric, _, _ = _metric()
    values, _ = OriginalValues.read(metric, _tagged("original"), [MaxDrop(0.01)])
    _, se = values.metric(metric, _tagged("original"))
    assert se is not None and 0 < se < 1e-3


def test_a_level_constraint_keeps_the_metric_s_own_standard_error():
    metric, _, candidate = _metric()
    values, baseline = OriginalValues.read(metric, _tagged("original"), [MinMetric(0.8)])
    assert values.values is None and baseline is None  # the caller evaluates the original as before
    _, se = values.metric(metric, _tagged("candidate"))
    assert se == pytest.approx(float(candidate.std() / math.sqrt(len(candidate))), rel=1e-6)


def test_a_plain_callable_has_no_standard_error():
    values, baseline = OriginalValues.read(lambda m: 0.5, _tagged("original"), [MaxDrop(0.01)])
    assert baseline is None
    assert values.metric(lambda m: 0.5, _tagged("candidate")) == (0.5, None)


def test_compress_stores_paired_noise_and_reads_the_original_once(mlp, digits):
    evaluate = tightfit.Accuracy(digits.loader("val", 512))
    strategy = Compose([Prune(sparsity=(0.0, 0.9)), Quantize(bits=(4, 8))])
    limit = MaxDrop(0.02)
    result = tightfit.compress(mlp, evaluate=evaluate, strategy=strategy, constraint=limit, budget=4, search="random")
    n = evaluate.num_samples
    # the original once (its values are kept), each of the four trials once, and the answer once
    # when the run finishes: reading the paired values costs no pass of its own
    assert evaluate.samples_evaluated == 6 * n
    assert len(result.trials) == 4
    for t in result.trials:
        accuracy = t.measurement.metric
        binomial = math.sqrt(accuracy * (1 - accuracy) / n)
        assert 0 < t.metric_se < binomial
