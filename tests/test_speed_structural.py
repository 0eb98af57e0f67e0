"""Structured pruning (coupled channel groups) and low-rank factorization."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.export.artifact import load_model, to_bytes
from tightfit.measure import analyze
from tightfit.operators import Compose, LowRank, Plan, Quantize, StructuredPrune, apply
from tightfit.operators.structured import kept_channels
from tightfit.search.space import build_space


class Block(nn.Module):
    """Residual block with BatchNorm; the addition couples its output channels with its input's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    """Residual blocks, a depthwise conv, a concatenation, and a classifier whose outputs are the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.side = nn.Conv2d(16, 8, 1)
        self.block2 = Block(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.block1(torch.relu(self.bn(self.stem(x))))
        x = torch.cat([self.depthwise(x), self.side(x)], dim=1)
        return self.fc(self.block2(x).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = ResNetLike()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong coupling shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _space(op):
    model = _model()
    op.prepare(model, X)
    return model, build_space(Compose([op]), analyze(model))


def test_groups_couple_residual_bn_and_concat_and_leave_the_output_layer():
    model, space = _space(StructuredPrune())
    groups = StructuredPrune(example_input=X)
    groups.prepare(model, None)
    members = groups.groups
    assert "fc" not in members  # its outputs are the model's outputs
    residual = next(names for names in members.values() if "block1.conv2" in names)
    # the residual addition ties stem, its BatchNorm, both block convs' outputs, and the depthwise conv
    assert {"stem", "bn", "block1.conv2", "block1.bn2", "depthwise"} <= set(residual)
    assert len(space.dimensions) == len(members)


def test_ratio_zero_keeps_function_and_half_ratio_keeps_output_shape():
    model, space = _space(StructuredPrune())
    same = apply(space.plan({k: 0.0 for k in space.keys}), model)
    assert torch.equal(same(X), model(X))
    half = apply(space.plan({k: 0.5 for k in space.keys}), model)
    out = half(X)
    assert out.shape == model(X).shape and torch.isfinite(out).all()
    assert sum(p.numel() for p in half.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    # coupled layers shrank together: the residual add still lines up
    assert (
        half.block1.conv2.out_channels == half.stem.out_channels == half.bn.num_features == half.depthwise.out_channels
    )
    assert half.block2.conv1.in_channels == half.depthwise.out_channels + half.side.out_channels


def test_plan_replays_on_a_fresh_instance_through_the_file():
    model, space = _space(StructuredPrune(round_to=4))
    plan = space.plan({k: 0.4 for k in space.keys})
    compressed = apply(plan, model)
    # a group inside a block keeps a multiple of 4 channels (groups joined by a concatenation
    # overlap, so their counts need not be)
    assert compressed.block1.conv1.out_channels % 4 == 0 and compressed.block2.conv1.out_channels % 4 == 0
    data = to_bytes(compressed, plan)
    fresh = ResNetLike()  # other random weights: the plan fixes shapes, the file fixes values
    loaded = load_model(io.BytesIO(data), model=fresh)
    assert torch.allclose(loaded(X), compressed(X), atol=1e-6)
    # the plan is plain JSON, so it survives a round trip
    assert torch.equal(apply(Plan.from_json(plan.to_json()), model)(X), compressed(X))


def test_a_group_that_would_lose_every_channel_is_refused():
    with pytest.raises(ConfigError, match="every channel"):
        StructuredPrune(ratio=1.0)
    model, space = _space(StructuredPrune())
    layers = {k.split("/")[0]: {"structured_prune": {"ratio": 0.0}} for k in space.keys}
    first = next(iter(layers))
    layers[first]["structured_prune"]["ratio"] = 1.0
    with pytest.raises(ConfigError, match="every channel"):
        apply(Plan(layers=layers, operators={"structured_prune": space.strategy.operators[0].config()}), model)
    assert kept_channels(3, 0.99, None) == 1 and kept_channels(16, 0.9, 8) == 8 and kept_channels(16, 0.6, 8) == 8


def test_layer_that_leads_no_group_is_a_clear_error():
    model, space = _space(StructuredPrune())
    plan = Plan(
        layers={"fc": {"structured_prune": {"ratio": 0.5}}},
        operators={"structured_prune": space.strategy.operators[0].config()},
    )
    with pytest.raises(ConfigError, match="leads no prunable channel group"):
        apply(plan, model)


def test_untraceable_model_leaves_structured_pruning_out_and_other_operators_on():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.from_numpy(self.fc(x).detach().numpy()))  # breaks the autograd trace

    model = Untraceable().eval()
    op = StructuredPrune()
    op.prepare(model, torch.randn(1, 4))
    assert op.groups == {}
    space = build_space(Compose([op, Quantize(8)]), analyze(model))
    assert set(space.fixed) == {"fc", "out"} and all(set(v) == {"quantize"} for v in space.fixed.values())


def test_low_rank_factorizes_only_where_cheaper_and_composes_with_quantize():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 64)
    strategy = Compose([LowRank(), Quantize(8)])
    full = apply(Plan.from_strategy(strategy, {"0": {"low_rank": {"rank_ratio": 1.0}}}), model)
    assert isinstance(full[0], nn.Linear)  # rank 64 is not cheaper than the layer: left whole
    plan = Plan.from_strategy(strategy, {"0": {"low_rank": {"rank_ratio": 0.25}, "quantize": {"bits": 8}}})
    low = apply(plan, model)
    assert isinstance(low[0], nn.Sequential) and low[0][0].out_features == 16
    assert low(x).shape == model(x).shape
    # quantization reached both factors inside the replaced layer
    assert all(hasattr(m, "parametrizations") for m in low[0])
    # a conv whose weight has rank 4 is reproduced exactly by a rank-4 factorization
    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval()
    with torch.no_grad():
        conv[0].weight.copy_((torch.randn(32, 4) @ torch.randn(4, 144)).reshape(32, 16, 3, 3))
    img = torch.randn(2, 16, 6, 6)
    factored = apply(Plan.from_strategy(Compose([LowRank()]), {"0": {"low_rank": {"rank_ratio": 0.125}}}), conv)
    assert factored[0][0].out_channels == 4 and factored[0][1].kernel_size == (1, 1)
    assert torch.allclose(factored(img), conv(img), atol=1e-3)
    data = to_bytes(low, plan)
    assert torch.allclose(load_model(io.BytesIO(data), model=model)(x), low(x), atol=1e-6)


def test_low_rank_skips_grouped_convolutions():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 32, 3)).eval()
    op = LowRank()
    op.prepare(model, None)
    names = [layer.name for layer in analyze(model).layers if op.supports(layer)]
    assert names == ["1"]


def test_public_names():
    assert tightfit.StructuredPrune is StructuredPrune and tightfit.LowRank is LowRank


class TinyTransformer(nn.Module):
    """Embedding, attention (whose output projection's weight is read directly), LSTM, LayerNorm,
    and a keyword-argument forward: the structural operators must leave what they cannot handle."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens, mask=None):
        h, _ = self.lstm(self.enc(self.emb(tokens)))
        return self.head(self.ln(h).mean(1))


def test_structural_operators_on_a_transformer_never_break_it():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    tokens = {"tokens": torch.randint(0, 50, (3, 7))}
    sp, lr = StructuredPrune(), LowRank()
    sp.prepare(model, tokens)
    lr.prepare(model, tokens)
    assert not any("self_attn" in m for members in sp.groups.values() for m in members)
    space = build_space(Compose([sp, lr]), analyze(model))
    assert not any(d.layer == "enc.self_attn.out_proj" and d.operator == "low_rank" for d in space.dimensions)
    for value in (0.0, 0.3):
        params = {k: (value if k.endswith("/ratio") else 0.3) for k in space.keys}
        compressed = apply(space.plan(params), model)
        assert compressed(**tokens).shape == (3, 5)


def test_compose_of_structural_and_weight_operators_searches_and_replays(tmp_path):
    torch.manual_seed(0)
    model = _model()
    x = X
    targets = model(x).argmax(1)
    evaluate = lambda m: float((m(x).argmax(1) == targets).float().mean())  # noqa: E731
    strategy = Compose([StructuredPrune(ratio=(0.0, 0.5)), LowRank(rank_ratio=(0.3, 1.0)), Quantize((8, 32))])
    result = tightfit.compress(
        model, evaluate=evaluate, strategy=strategy, constraint=tightfit.MaxDrop(1.0), example_input=x, budget=2, seed=0
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    keys = set(result.best_trial.plan.layers["block1.conv1"])
    assert keys == {"structured_prune", "low_rank", "quantize"}
    loaded = load_model(io.BytesIO(result.artifact), model=ResNetLike())
    assert torch.allclose(loaded(x), result.model(x), atol=1e-5)


class ResNeXtLike(nn.Module):
    """A ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand, a residual addition (BatchNorms after)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.reduce, self.bn1 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.grouped, self.bn2 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.expand = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        y = self.expand(torch.relu(self.bn2(self.grouped(torch.relu(self.bn1(self.reduce(h)))))))
        return self.head((h + y).mean(dim=(2, 3)))


def _resnext() -> ResNeXtLike:
    torch.manual_seed(0)
    model = ResNeXtLike().eval()
    for bn in (model.bn1, model.bn2):  # statistics of a trained model, so BatchNorm is not the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def _kept(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which output channels of a layer survived pruning, found by their (distinct) bias values."""
    return [i for i in range(before.shape[0]) if bool((after == before[i]).any())]


def test_grouped_convolutions_are_pruned_keeping_equal_groups_and_pruning_equals_zeroing():
    # Torch-Pruning 1.6 keeps a grouped conv's first kept/groups weight columns: right only when every
    # group lost the same positions. Whatever is removed must give what zeroing the weights reading it gives.
    import copy

    model, x = _resnext(), torch.randn(2, 3, 6, 6)
    op = StructuredPrune()
    op.prepare(model, x)
    assert {"reduce", "grouped"} <= set(op.groups) and not op.refused()
    for ratio in (0.3, 0.5, 0.75):
        plan = Plan.from_strategy(
            Compose([op]), {name: {"structured_prune": {"ratio": ratio}} for name in ("reduce", "grouped")}
        )
        pruned = apply(plan, model)
        g = pruned.grouped
        assert (
            g.groups == 4
            and g.in_channels % 4 == 0
            and g.out_channels % 4 == 0
            and g.in_channels < 16
            and g.out_channels < 24
        )
        gone_in = sorted(set(range(16)) - set(_kept(model.reduce.bias, pruned.reduce.bias)))
        gone_out = sorted(set(range(24)) - set(_kept(model.grouped.bias, pruned.grouped.bias)))
        assert len(gone_in) == 16 - g.in_channels and len(gone_out) == 24 - g.out_channels
        assert [c % 4 for c in gone_in[: len(gone_in) // 4]] * 4 == [c % 4 for c in gone_in]  # same positions per group
        assert len({sum(c // 6 == group for c in gone_out) for group in range(4)}) == 1  # as many outputs per group
        zeroed = copy.deepcopy(model)
        with torch.no_grad():  # the readers ignore the removed channels: the grouped conv's columns, expand's
            for c in gone_in:
                zeroed.grouped.weight[(c // 4) * 6 : (c // 4 + 1) * 6, c % 4] = 0
            zeroed.expand.weight[:, gone_out] = 0
            assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)
    # replayed on a fresh instance through the file, as any plan
    loaded = load_model(io.BytesIO(to_bytes(pruned, plan)), model=ResNeXtLike())
    assert loaded.grouped.in_channels == g.in_channels and torch.allclose(loaded(x), pruned(x), atol=1e-6)


def test_the_check_catches_grouped_convolutions_pruned_at_unequal_positions(monkeypatch):
    from tightfit.operators import structured

    model, x = _resnext(), torch.randn(2, 3, 6, 6)
    assert structured.pruning_unlike_zeroing(model, x, ["reduce", "grouped"], 0.5) == []
    # as Torch-Pruning's graph would do it left alone: the lowest channels wherever they are
    monkeypatch.setattr(
        structured, "_choose_periodic_drop", lambda scores, period, n: list(range(n // period, n + n // period))
    )
    assert structured.pruning_unlike_zeroing(model, x, ["reduce", "grouped"], 0.5) == ["reduce", "grouped"]


class GroupedReaders(nn.Module):
    """Grouped convolutions Torch-Pruning cannot keep equal: one reads a concatenation, one has one
    output channel per group (Torch-Pruning takes it for depthwise), one is transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.cat_reader = nn.Conv2d(16, 8, 1, groups=4)
        self.c = nn.Conv2d(3, 8, 1)
        self.narrow = nn.Conv2d(8, 4, 1, groups=4)
        self.d = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.head = nn.Linear(8 + 4 + 8, 2)

    def forward(self, x):
        joined = self.cat_reader(torch.cat([self.a(x), self.b(x)], dim=1)).mean(dim=(2, 3))
        return self.head(
            torch.cat([joined, self.narrow(self.c(x)).mean(dim=(2, 3)), self.up(self.d(x)).mean(dim=(2, 3))], 1)
        )


def test_grouped_convolutions_torch_pruning_cannot_keep_equal_are_refused_with_the_reason():
    op = StructuredPrune()
    op.prepare(GroupedReaders().eval(), torch.randn(2, 3, 4, 4))
    why = op.refused()
    assert "only part of its input channels" in why["a"] and "cat_reader: groups=4" in why["a"]
    assert "one output channel per group" in why["c"] and "depthwise" in why["c"]
    assert "transposed" in why["d"] and "up: groups=2" in why["d"]
    assert not {"a", "b", "c", "d"} & set(op.groups) and "cat_reader" in op.groups  # its own outputs are fine


class GroupNormThenGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.grouped(torch.relu(self.norm(self.conv(x)))).mean(dim=(2, 3)))


def test_a_grouped_convolution_group_whose_pruning_is_not_zeroing_is_refused():
    # GroupNorm's statistics change when channels go (zeroing them keeps them in the mean)
    torch.manual_seed(0)
    op = StructuredPrune()
    op.prepare(GroupNormThenGrouped().eval(), torch.randn(2, 3, 5, 5))
    assert "does not compute what zeroing them does" in op.refused()["conv"] and set(op.groups) == {"grouped"}


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x)))).mean(dim=(2, 3))


def test_a_groupnorm_keeps_as_many_channels_in_each_of_its_groups():
    # the lowest-magnitude channels all sit in GroupNorm groups 1-3: chosen across the layer, the
    # pruned norm's groups would mix channels that were normalized apart
    from tightfit.operators.structured import prune_groups

    torch.manual_seed(0)
    model = GroupNormNet().eval()
    with torch.no_grad():
        model.conv.weight[4:] *= 0.01
    original = model.conv.weight.detach().clone()
    prune_groups(model, {"conv": 0.5}, torch.randn(2, 3, 5, 5))
    assert model.norm.num_channels == 8 and model.norm.num_groups == 4
    kept = [int(torch.nonzero((original == row).all(dim=(1, 2, 3)))[0]) for row in model.conv.weight.detach()]
    assert [sum(1 for c in kept if c // 4 == g) for g in range(4)] == [2, 2, 2, 2], kept
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 5)
