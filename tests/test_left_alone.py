"""What a run reports as left alone: only what no operator compresses, each with a reason that says why."""

from __future__ import annotations

import torch
from torch import nn

import tightfit


def _closeness(model, x):
    """Minus the mean squared distance to the original's outputs (higher is better)."""
    with torch.no_grad():
        reference = model(x)

    def metric(candidate):
        with torch.no_grad():
            return -float(((candidate(x) - reference) ** 2).mean())

    return metric


def _compress(model, x, strategy):
    return tightfit.compress(
        model,
        evaluate=_closeness(model, x),
        strategy=strategy,
        constraint=tightfit.MaxDrop(100.0),
        budget=1,
        search="random",
        example_input=x,
    )


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


def test_layers_pruned_with_the_group_they_follow_are_not_left_alone():
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = torch.randn(4, 5, 16)
    result = _compress(model, x, tightfit.StructuredPrune(ratio=0.5, head_ratio=0.0))
    assert "enc.linear1" in result.plan.layers and "enc.linear2" not in result.plan.layers
    assert result.model.enc.linear2.in_features == 16  # its input channels went with enc.linear1's group
    left = {s.name for s in result.left_alone}
    assert "enc.linear2" not in left and "enc.linear1" not in left
    assert any("enc.linear2 follows enc.linear1" in note for note in result.notes), result.notes


def test_a_follower_of_a_group_outside_the_layers_patterns_is_still_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    result = _compress(model, x, tightfit.StructuredPrune(ratio=0.5, layers=["0"]))
    assert set(result.plan.layers) == {"0"} and result.model[2].in_features == 8
    reasons = {s.name: s.reason for s in result.left_alone}
    assert "2" not in reasons  # its input channels follow group "0"
    assert (
        "group of 2" in reasons["4"] and "`layers` patterns" in reasons["4"]
    )  # it follows only group "2", which the patterns leave out


def test_a_layer_no_operator_handles_says_which_operators_and_which_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    result = _compress(model, x, tightfit.Int8(choices=(True,)))
    reasons = {s.name: s.reason for s in result.left_alone}
    assert "int8 does not compress a Conv2d layer" in reasons["0"]


# Grouped convolutions: tests/test_speed_structural.py (pruned, or refused with the reason).


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=2))


def test_a_group_with_a_group_norm_keeps_a_multiple_of_its_groups_at_every_ratio():
    from tightfit.operators import Compose, Plan

    model = GroupNormNet().eval()
    x = torch.randn(2, 2, 10)
    op = tightfit.StructuredPrune()
    op.prepare(model, x)
    assert op.groups == {"conv": ["conv", "norm", "head"]} and not op.refused()
    for ratio in (0.2, 0.3, 0.55, 0.7):
        pruned = tightfit.apply(
            Plan.from_strategy(Compose([op]), {"conv": {"structured_prune": {"ratio": ratio}}}), model
        )
        assert pruned.conv.out_channels % 4 == 0 and pruned.conv.out_channels < 16 and pruned(x).shape == (2, 3)


class TaggerWithOwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.start = nn.Parameter(torch.zeros(1, 1, 8))  # held by the model itself, not by a layer
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(torch.cat([self.start.expand(x.shape[0], 1, 8), x], dim=1))
        return self.head(self.norm(out[:, -1]))


def test_modules_left_alone_say_what_they_are():
    analysis = tightfit.analyze(TaggerWithOwnParameter())
    reasons = {s.name: s.reason for s in analysis.skipped}
    assert "rnn" not in reasons and analysis.layer("rnn").kind == "GRU"  # prune and quantize take its weights
    assert reasons["norm"].startswith("normalization layer")
    assert "held directly by the model's top-level module (TaggerWithOwnParameter)" in reasons["start"]
    wrapped = nn.Sequential(TaggerWithOwnParameter())  # a module below the top holds it: named by that module
    assert "(start)" in {s.name: s.reason for s in tightfit.analyze(wrapped).skipped}["0"]


class WithPositions(nn.Module):
    """A learned position embedding and a class token held by the model itself (its path is "")."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 16) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.proj(x + self.pos))
        return self.head(torch.cat([self.cls.expand(x.shape[0], 1, 16), h], dim=1).mean(dim=1))


def test_parameters_the_model_holds_itself_are_named_after_themselves_in_result_summary_and_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from tightfit.cli.app import app

    torch.manual_seed(0)
    model, x = WithPositions().eval(), torch.randn(4, 5, 16)
    result = tightfit.compress(
        model,
        evaluate=_closeness(model, x),
        strategy=tightfit.Prune(),
        budget=1,
        constraint=tightfit.MaxDrop(100.0),
        search="random",
        run_dir=tmp_path / "run",
    )
    left = {s.name: s for s in result.left_alone}
    assert set(left) == {"pos", "cls"}  # no entry with an empty name
    assert (
        left["pos"].type == "Parameter"
        and left["pos"].params == 80
        and "top-level module (WithPositions)" in left["pos"].reason
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {e["name"] for e in summary["left_alone"]} == {"pos", "cls"}
    shown = CliRunner().invoke(app, ["report", str(tmp_path / "run")], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.output.splitlines() if "Parameter" in line]
    assert "left alone (2)" in shown.output and rows[0].split("│")[1].strip() == "pos" and "80" in rows[0]
    # a top-level module left alone as a whole is "<root>" (attention's packed q/k/v; its out_proj is pruned)
    attention, q = nn.MultiheadAttention(16, 2, batch_first=True).eval(), torch.randn(2, 5, 16)
    bare = tightfit.compress(
        attention,
        evaluate=lambda m: -float(m(q, q, q)[0].abs().mean()),
        strategy=tightfit.Prune(),
        constraint=tightfit.MaxDrop(100.0),
        budget=1,
        search="random",
        example_input=(q, q, q),
    )
    assert [s.name for s in bare.left_alone] == ["<root>"] and "packed q/k/v" in bare.left_alone[0].reason


def test_a_layer_leading_no_channel_group_is_named_as_such():
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    result = _compress(model, torch.randn(4, 5, 16), tightfit.StructuredPrune(ratio=0.5, head_ratio=0.0))
    reasons = {s.name: s.reason for s in result.left_alone}
    assert "finds no channel group this layer leads" in reasons["head"], reasons
