import copy

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.operators import Compose, Plan, Prune, Quantize, apply
from tightfit.operators.prune import magnitude_mask


def _uniform_plan(strategy, names, **per_op):
    return Plan.from_strategy(strategy, {n: {op: dict(s) for op, s in per_op.items()} for n in names})


LAYERS = ["1", "3", "5"]


def test_identity_settings_change_no_output(mlp, digits):
    strategy = Compose([Prune(), Quantize()])
    plan = _uniform_plan(strategy, LAYERS, prune={"sparsity": 0.0}, quantize={"bits": 32})
    compressed = apply(plan, mlp)
    x = digits.x_val
    assert torch.equal(compressed(x), mlp(x))


def test_apply_leaves_the_input_model_unchanged(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    strategy = Compose([Prune()])
    apply(_uniform_plan(strategy, LAYERS, prune={"sparsity": 0.9}), mlp)
    after = mlp.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.999, 1.0])
def test_magnitude_mask_removes_the_requested_fraction_smallest_first(sparsity):
    torch.manual_seed(0)
    w = torch.randn(50, 40)
    mask = magnitude_mask(w, sparsity)
    n_zero = int((mask == 0).sum())
    assert n_zero == round(sparsity * w.numel())
    if 0 < n_zero < w.numel():
        assert w.abs()[mask == 0].max() <= w.abs()[mask == 1].min()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_weights_lie_on_a_per_channel_grid(mlp, bits):
    strategy = Compose([Quantize(bits=bits)])
    compressed = apply(_uniform_plan(strategy, LAYERS, quantize={"bits": bits}), mlp)
    weight = compressed[1].weight.detach()
    for row in weight:
        assert len(torch.unique(row)) <= 2**bits - 1


def test_half_precision_is_float16_representable(mlp):
    compressed = apply(_uniform_plan(Compose([Quantize(bits=16)]), LAYERS, quantize={"bits": 16}), mlp)
    w = compressed[3].weight.detach()
    assert torch.equal(w, w.half().float())


def test_pruned_zeros_survive_finetuning_and_weights_stay_on_grid(mlp, digits):
    strategy = Compose([Prune(), Quantize(bits=(4,))])
    plan = _uniform_plan(strategy, LAYERS, prune={"sparsity": 0.8}, quantize={"bits": 4})
    compressed = apply(plan, mlp)
    zeros_before = compressed[1].weight.detach() == 0
    tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-2)(compressed)
    w = compressed[1].weight.detach()
    assert torch.all(w[zeros_before] == 0)
    # the underlying float weights did move (training happened) ...
    assert not torch.equal(compressed[1].parametrizations.weight.original, mlp[1].weight)
    # ... and the effective weight is still on a 4-bit grid
    assert all(len(torch.unique(row)) <= 15 for row in w)


def test_plan_round_trips_through_json_to_the_same_model(mlp, digits):
    strategy = Compose([Prune(), Quantize(bits=(4, 8))])
    plan = Plan.from_strategy(
        strategy,
        {
            "1": {"prune": {"sparsity": 0.7}, "quantize": {"bits": 4}},
            "3": {"prune": {"sparsity": 0.5}, "quantize": {"bits": 8}},
            "5": {"prune": {"sparsity": 0.1}, "quantize": {"bits": 4}},
        },
    )
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    x = digits.x_val
    assert torch.equal(apply(plan, mlp)(x), apply(text, copy.deepcopy(mlp))(x))
    assert torch.equal(apply(again, mlp)(x), apply(plan.to_dict(), mlp)(x))


def test_plan_errors_name_the_problem(mlp):
    strategy = Compose([Prune()])
    with pytest.raises(ConfigError, match="nope"):
        apply(_uniform_plan(strategy, ["nope"], prune={"sparsity": 0.5}), mlp)
    bad = Plan.from_strategy(strategy, {"1": {"prune": {"sparsity": 0.5, "amount": 3}}})
    with pytest.raises(ConfigError, match="amount"):
        apply(bad, mlp)
    with pytest.raises(ConfigError, match="sparsity"):
        apply(_uniform_plan(strategy, ["1"], prune={"sparsity": 1.5}), mlp)


def test_operator_arguments_are_validated_on_construction():
    with pytest.raises(ConfigError, match="bits"):
        Quantize(bits=(1, 4))
    with pytest.raises(ConfigError, match="sparsity"):
        Prune(sparsity=(0.9, 0.1))
    with pytest.raises(ConfigError, match="sparsity"):
        Prune(sparsity=1.2)
    with pytest.raises(ConfigError, match="once"):
        Compose([Prune(), Prune()])
    with pytest.raises(ConfigError):
        Compose([])


def test_layer_patterns_limit_an_operator(mlp):
    from tightfit.measure import analyze
    from tightfit.search import build_space

    space = build_space(Compose([Prune(layers=["1", "3"]), Quantize(bits=(4, 8))]), analyze(mlp))
    pruned_layers = {d.layer for d in space.dimensions if d.operator == "prune"}
    assert pruned_layers == {"1", "3"}
    assert {d.layer for d in space.dimensions if d.operator == "quantize"} == set(LAYERS)


def test_conv_layers_are_compressed_too():
    from tightfit.demo import LeNet5

    torch.manual_seed(0)
    model = LeNet5().eval()
    strategy = Compose([Prune(), Quantize(bits=(4,))])
    plan = Plan.from_strategy(strategy, {"features.0": {"prune": {"sparsity": 0.5}, "quantize": {"bits": 4}}})
    compressed = apply(plan, model)
    assert int((compressed.features[0].weight == 0).sum()) == round(0.5 * model.features[0].weight.numel())
    assert compressed(torch.randn(2, 64)).shape == (2, 10)
    assert isinstance(compressed.features[0], nn.Conv2d)
