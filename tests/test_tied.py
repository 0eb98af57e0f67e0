"""Tied weights (an output head sharing its input embedding's Parameter) compressed once, with one
setting, and kept tied through fine-tuning, save / load and export."""

from __future__ import annotations

import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.export.artifact import read_manifest
from tightfit.operators import Compose, Plan, Prune, Quantize


class TinyLM(nn.Module):
    """Embedding(50, 16) -> Linear -> ReLU -> Linear -> Linear(16, 50) whose weight is the embedding's."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        else:
            self.head.weight = nn.Parameter(self.embed.weight.detach().clone())

    def forward(self, tokens):
        return self.head(self._hidden(tokens))

    def _hidden(self, tokens):
        return self.down(torch.relu(self.up(self.embed(tokens))))


STRATEGY = Compose([Prune(), Quantize(bits=(3, 8))])
SETTINGS = {"prune": {"sparsity": 0.5}, "quantize": {"bits": 3}}
TOKENS = torch.arange(40).reshape(4, 10) % 50


def _lm(tied: bool = True) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(tied).eval()


def _compressed():
    plan = Plan.from_strategy(STRATEGY, {"embed": SETTINGS})
    return plan, tightfit.apply(plan, _lm())


def _lm_loss(model, batch):
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def _assert_tied_and_compressed(model):
    embed, head = model.embed.weight, model.head.weight
    assert torch.equal(embed, head)
    assert int((embed == 0).sum()) >= embed.numel() // 2  # sparsity 0.5 (3-bit rounding zeroes a few more)
    for row in embed:  # 3 bits: at most 7 levels per row (per-channel grid), zero included
        assert len(torch.unique(row)) <= 7
    # the head computes with the compressed tensor: its output is the hidden state times it
    assert torch.allclose(model(TOKENS), model._hidden(TOKENS) @ embed.T, atol=1e-6)


def test_the_tied_group_is_one_layer_led_by_the_first_module_and_not_left_alone():
    analysis = tightfit.analyze(_lm())
    assert [(layer.name, layer.tied) for layer in analysis.layers] == [("embed", ("head",)), ("up", ()), ("down", ())]
    assert analysis.skipped == ()
    assert analysis.weight_params == 50 * 16 + 2 * 16 * 32  # the shared tensor counted once


def test_prune_and_quantize_compress_the_shared_tensor_once_for_both_modules():
    _, model = _compressed()
    _assert_tied_and_compressed(model)
    originals = {id(m.parametrizations.weight.original) for m in (model.embed, model.head)}
    steps = [list(m.parametrizations.weight) for m in (model.embed, model.head)]
    assert len(originals) == 1 and all(a is b for a, b in zip(*steps)) and len(steps[0]) == 2
    assert sum(p.numel() for p in model.parameters()) == 50 * 16 + 2 * 16 * 32 + 32 + 16


def test_sparse_flops_count_the_head_that_computes_with_the_pruned_tied_weight():
    from tightfit.measure.analysis import layer_flops, sparse_flops

    _, model = _compressed()
    flops = layer_flops(model, TOKENS)
    density = float((model.embed.weight != 0).float().mean())
    assert sparse_flops(model, TOKENS, ["embed"]) == flops[""] - round(flops["head"] * (1 - density))


def test_fine_tuning_holds_the_mask_and_trains_the_one_original_through_both_modules():
    _, model = _compressed()
    mask = model.embed.parametrizations.weight[0].mask
    pruned = mask == 0
    original = model.embed.parametrizations.weight.original
    before = original.detach().clone()
    # the head alone (no embedding lookup) sends a gradient to the shared original
    model.head(torch.randn(3, 16)).sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0
    original.grad = None
    loader = [(TOKENS, (TOKENS + 1) % 50)] * 3
    tightfit.FineTune(loader, epochs=1, lr=1e-2, loss=_lm_loss)(model)
    assert not torch.equal(original, before)
    assert model.head.parametrizations.weight.original is original
    assert model.head.parametrizations.weight[0].mask is mask and torch.equal(mask == 0, pruned)
    assert (model.head.weight[pruned] == 0).all() and (original[pruned] != 0).any()  # held by the mask
    _assert_tied_and_compressed(model)


def test_save_stores_the_shared_tensor_once_and_load_keeps_it_tied(tmp_path):
    plan, model = _compressed()
    expected = model(TOKENS)
    path = tmp_path / "tied.tfz"
    size = tightfit.save(model, path, plan=plan)
    for loaded in (tightfit.load(path, model=_lm()),):  # a user's class: loaded into a given instance
        assert loaded.head.weight is loaded.embed.weight
        assert torch.equal(loaded(TOKENS), expected)
        _assert_tied_and_compressed(loaded)
    tensors = read_manifest(path)["tensors"]
    assert [t["alias_of"] for t in tensors if "alias_of" in t] == ["embed.weight"]
    untied_plan = Plan.from_strategy(STRATEGY, {"embed": SETTINGS, "head": SETTINGS})
    untied_path = tmp_path / "untied.tfz"
    untied_size = tightfit.save(tightfit.apply(untied_plan, _lm(tied=False)), untied_path, plan=untied_plan)
    # deflate finds most of an identical second copy, so the file gains little; the payload shows it whole
    (table_bytes,) = [t["length"] for t in tensors if t["name"] == "embed.weight"]
    assert _payload_bytes(untied_path) - _payload_bytes(path) == table_bytes
    assert size < untied_size


def _payload_bytes(path) -> int:
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo("payload.bin").file_size


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.onnx), "torchscript"])
def test_export_runs_the_compressed_tied_weight(tmp_path, fmt):
    _, model = _compressed()
    report = tightfit.export_model(model, TOKENS, tmp_path / f"m.{fmt}", format=fmt)  # checks outputs agree
    assert report is not None


def test_compress_searches_the_tied_weight_as_one_layer():
    model = _lm()
    with torch.no_grad():
        reference = model(TOKENS)

    def closeness(candidate):
        with torch.no_grad():
            return -float(((candidate(TOKENS) - reference) ** 2).mean())

    result = tightfit.compress(
        model,
        evaluate=closeness,
        strategy=Compose([Prune(), Quantize()]),
        constraint=tightfit.MaxDrop(100.0),
        budget=3,
        search="random",
        example_input=TOKENS,
    )
    assert "embed" in result.plan.layers and "head" not in result.plan.layers
    assert not result.left_alone
    assert result.model.head.weight is result.model.embed.weight  # the saved model, read back
    assert result.plan.layers["embed"]["prune"]["sparsity"] > 0 or result.plan.layers["embed"]["quantize"]["bits"] < 32


@pytest.mark.parametrize(
    "strategy, words",
    [
        (tightfit.Int8(), "int8 runs the layer as a quantized Linear"),
        (tightfit.LowRank(), "low_rank would replace the layer by two factors"),
        (tightfit.StructuredPrune(ratio=0.5), "structured_prune would change the shape of a weight shared with head"),
    ],
)
def test_shape_changing_and_module_swapping_operators_leave_the_tied_weight_alone_and_say_why(strategy, words):
    model = _lm()
    result = tightfit.compress(
        model,
        evaluate=lambda m: 0.0,
        strategy=strategy,
        constraint=tightfit.MaxDrop(100.0),
        budget=1,
        search="random",
        example_input=TOKENS,
    )
    assert "embed" not in result.plan.layers and "head" not in result.plan.layers
    reasons = {s.name: s.reason for s in result.left_alone}
    assert words in reasons["embed"] and "head" in reasons["embed"], reasons
    if isinstance(strategy, tightfit.StructuredPrune):  # the group whose channels the head reads is refused too
        assert "would change the shape of head's weight" in strategy.refused()["down"]
        assert result.model.up.out_features == 16 and result.model.down.in_features == 16  # the rest still pruned
    assert result.model.head.weight is result.model.embed.weight


def test_a_plan_that_would_untie_or_doubly_compress_the_tied_weight_is_refused():
    strategy = Compose([Prune(), tightfit.Int8()])
    with pytest.raises(ConfigError, match="'head' shares its weight with 'embed'.*move the settings to 'embed'"):
        tightfit.apply(Plan.from_strategy(strategy, {"head": {"prune": {"sparsity": 0.5}}}), _lm())
    with pytest.raises(ConfigError, match="int8 runs the layer as a quantized Linear"):
        tightfit.apply(Plan.from_strategy(strategy, {"embed": {"int8": {"int8": True}}}), _lm())


def test_recovery_sees_the_tied_weight_once_and_swaps_its_steps_in_every_module():
    from tightfit.recovery._base import sites, swapped_steps

    _, model = _compressed()
    (site,) = [s for s in sites(model) if s.module is model.embed]
    assert [s.name for s in sites(model)] == ["embed.weight"]
    assert site.tied_chains == [model.head.parametrizations.weight]
    swaps = [swap for i in range(len(site.chain)) for swap in site.swap(i, nn.Identity())]
    with swapped_steps(swaps):  # as learning-compression's L-step: both modules see the uncompressed weight
        assert torch.equal(model.head.weight, site.original) and torch.equal(model.embed.weight, site.original)
    _assert_tied_and_compressed(model)
    lc = tightfit.LearningCompression([(TOKENS, (TOKENS + 1) % 50)] * 2, epochs=1, loss=_lm_loss)
    lc(model)
    _assert_tied_and_compressed(model)
    assert model.head.parametrizations.weight.original is model.embed.parametrizations.weight.original


def test_a_layers_pattern_naming_the_head_reaches_the_weight_it_shares():
    analysis = tightfit.analyze(_lm())
    strategy = Compose([Prune(layers=["head"])])
    assert [op.name for op in strategy.operators_for(analysis.layer("embed"))] == ["prune"]
    assert strategy.operators_for(analysis.layer("up")) == []
