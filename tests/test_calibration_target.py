"""``target="original"``: calibrated layers fit to the original model's outputs (on its inputs)
before they are compressed, so that the errors of the layers compressed before them are
compensated too (tightfit.operators.solvers.original_target)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tightfit
from tightfit import ConfigError, Prune, Quantize
from tightfit.operators.calibrated import apply_plan_calibrated
from tightfit.operators.solvers import original_target
from tightfit.run.oneshot import one_shot_plan


def _deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, 64), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10)).eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda target: Prune(0.6, method="sparsegpt", target=target),
        lambda target: Prune(0.6, method="wanda", target=target),
        lambda target: Quantize(3, method="gptq", target=target),
    ],
    ids=["sparsegpt", "wanda", "gptq"],
)
def test_fitting_to_the_original_outputs_brings_the_model_closer_to_the_original(make):
    """Five layers compressed in turn: fitting each to the original model's outputs makes the
    final outputs closer to the original's on held-out inputs than fitting each to its own."""
    model = _deep_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 32, generator=g)
    calibration, held_out = [x[:256], x[256:512]], x[512:]
    with torch.no_grad():
        wanted = model(held_out)
    errors = {}
    for target in ("layer", "original"):
        result = tightfit.compress_once(model, make(target), calibration=calibration, repair=())
        assert not result.uncalibrated
        with torch.no_grad():
            errors[target] = float((result.model(held_out) - wanted).pow(2).mean())
    # measured: sparsegpt 0.00044 -> 0.00032, wanda 0.00068 -> 0.00032, gptq 9e-5 -> 7e-5 (one calibration batch)
    assert errors["original"] < 0.9 * errors["layer"]


def test_the_fit_is_the_weight_itself_where_the_inputs_did_not_change_and_keeps_dead_inputs():
    torch.manual_seed(0)
    weight = torch.randn(1, 6, 8)
    x = torch.randn(100, 8)
    x[:, 3] = 0.0  # an input never seen: its column is kept as it was
    gram = (x.T @ x)[None]
    assert torch.allclose(original_target(weight, gram, gram, 0.01), weight, atol=1e-4)
    shifted = x * torch.linspace(0.5, 2.0, 8) + 0.01 * torch.randn(100, 8) * (x != 0)  # inputs rescaled
    fit = original_target(weight, (shifted.T @ shifted)[None], (x.T @ shifted)[None], 0.01)
    assert torch.equal(fit[..., 3], weight[..., 3])
    # the fit's outputs on the shifted inputs are closer to the original outputs than the weight's own
    wanted = x @ weight[0].T
    assert (shifted @ fit[0].T - wanted).norm() < 0.1 * (shifted @ weight[0].T - wanted).norm()


def test_cached_blocks_give_the_whole_model_weights_when_fitting_to_the_original():
    """The original model's passes use its own block cache in step with the compressed model's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(3)]
    weights = {}
    for target in ("layer", "original"):
        strategy = Prune(0.5, method="sparsegpt", target=target, layers=["transformer.h.*"])
        plan, _ = one_shot_plan(model, strategy)
        for block_cache in (True, False):
            work = copy.deepcopy(model)
            result = apply_plan_calibrated(plan, work, calibration, block_cache=block_cache)
            assert (result.blocks == "transformer.h") == block_cache
            weights[target, block_cache] = {k: v.detach().clone() for k, v in work.state_dict().items()}
    for target in ("layer", "original"):
        cached, whole = weights[target, True], weights[target, False]
        assert all(torch.allclose(cached[k], whole[k], atol=1e-5) for k in cached)
    fitted, own = weights["original", True], weights["layer", True]
    assert not all(torch.allclose(fitted[k], own[k]) for k in fitted)  # the fit changed the answer


def test_target_is_checked_and_kept_in_the_strategy():
    with pytest.raises(ConfigError, match="`target` must be one of"):
        Prune(0.5, method="sparsegpt", target="model")
    with pytest.raises(ConfigError, match="target='original'.*method='wanda' or 'sparsegpt'"):
        Prune(0.5, target="original")  # magnitude pruning reads no data
    with pytest.raises(ConfigError, match="target='original'.*method='gptq' or awq=True"):
        Quantize(4, target="original")
    op = Quantize(4, method="gptq", target="original")
    assert Quantize.from_config(op.config()).target == "original"
    assert "target" not in Prune(0.5, method="sparsegpt").config()  # plans recorded before load unchanged


def test_the_model_given_is_not_changed_and_layers_it_cannot_fit_are_named():
    """compress_once fits to the caller's model itself (no second copy): it is run in eval mode
    and handed back unchanged, in its own mode. A layer a structural operator replaced (low rank's
    factors) has no counterpart in it, and is named in ``not_fitted``."""
    model = _deep_mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [torch.randn(128, 32, generator=torch.Generator().manual_seed(1))]
    result = tightfit.compress_once(model, Prune(0.5, method="sparsegpt", target="original"), calibration, repair=())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not result.not_fitted
    strategy = tightfit.Compose(
        [tightfit.LowRank(0.25, layers=["2"]), Prune(0.5, method="sparsegpt", target="original")]
    )
    result = tightfit.compress_once(model, strategy, calibration, repair=())
    assert set(result.not_fitted) == {"2.0", "2.1"} and "structural" in result.not_fitted["2.0"]
