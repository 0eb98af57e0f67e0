"""Round-to-nearest treats a layer's rows as its OUTPUT channels whichever way round it stores them:
a matrix layer stored input-major (Hugging Face GPT-2's Conv1D, ``x @ W + b`` with W ``in x out``)
gets the same grid (group-wise: groups of inputs; per channel: one scale per output), and the same
file, as the ``nn.Linear`` holding ``W.t()``."""

from __future__ import annotations

import io

import torch
from torch import nn

from tightfit import Quantize, compress_once
from tightfit.export.artifact import load_model, to_bytes
from tightfit.operators.plan import Plan


class _InputMajor(nn.Module):
    """A matrix layer stored input-major, as Conv1D (no transformers needed: tightfit recognises the
    layout by what the layer computes, see operators/matrix.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _pair(inputs: int = 64, outputs: int = 48) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    # rows of very different size, so grouping along outputs instead of inputs changes the scales
    weight = torch.randn(outputs, inputs) * torch.logspace(-2, 0, outputs).unsqueeze(1)
    bias = torch.randn(outputs) * 0.1
    head = nn.Linear(outputs, 5)
    linear = nn.Linear(inputs, outputs)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    as_linear = nn.Sequential(linear, nn.ReLU(), head).eval()
    as_input_major = nn.Sequential(_InputMajor(weight.t(), bias), nn.ReLU(), head).eval()
    fresh = nn.Sequential(_InputMajor(torch.zeros(inputs, outputs), torch.zeros(outputs)), nn.ReLU(), nn.Linear(48, 5))
    return as_linear, as_input_major, fresh


def _matrix(model: nn.Module) -> torch.Tensor:
    """The first layer's effective weight as ``out x in``."""
    layer = model[0]
    with torch.no_grad():
        return layer.weight.detach().clone() if isinstance(layer, nn.Linear) else layer.weight.detach().t().clone()


def test_group_wise_rtn_groups_inputs_of_an_input_major_layer():
    as_linear, as_input_major, fresh = _pair()
    strategy = Quantize(4, group_size=32)  # 64 inputs: two groups per output row
    a = compress_once(as_linear, strategy)
    b = compress_once(as_input_major, strategy)
    assert torch.equal(_matrix(a.model), _matrix(b.model))
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.allclose(a.model(x), b.model(x), atol=1e-6)
    blob_a, blob_b = to_bytes(a.model, a.plan), to_bytes(b.model, b.plan)
    assert abs(len(blob_a) - len(blob_b)) < 64, (len(blob_a), len(blob_b))
    loaded = load_model(io.BytesIO(blob_b), model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), b.model(x))
        assert torch.equal(load_model(io.BytesIO(blob_b))(x), b.model(x))


def test_files_saved_before_load_as_they_were_made():
    """A plan written before input-major layers ran as Linears (no `matrix_as_linear` among its
    operator's arguments) is replayed as it was made: the layer stays input-major, its groups along
    the stored last axis, so a file saved then loads into a fresh model unchanged."""
    _, as_input_major, fresh = _pair()
    old_way = compress_once(as_input_major, Quantize(4, group_size=32, matrix_as_linear=False))
    assert not isinstance(old_way.model[0], nn.Linear)
    recorded = old_way.plan.to_dict()
    assert recorded["operators"]["quantize"].pop("matrix_as_linear") is False
    old_plan = Plan.from_dict(recorded)  # as a file from before records it
    assert not old_plan.strategy().operators[0].needs_linear({"bits": 4, "group_size": 32})
    x = torch.randn(16, 64)
    loaded = load_model(io.BytesIO(to_bytes(old_way.model, old_plan)), model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), old_way.model(x))
    new_way = compress_once(as_input_major, Quantize(4, group_size=32))
    assert new_way.plan.operators["quantize"]["matrix_as_linear"] is True
    assert isinstance(new_way.model[0], nn.Linear)


def test_per_channel_rtn_scales_outputs_of_an_input_major_layer():
    """Per-channel round-to-nearest: one scale per OUTPUT channel whichever way the layer stores its
    weight (before, an input-major layer got one per stored row: per input)."""
    as_linear, as_input_major, fresh = _pair()
    a = compress_once(as_linear, Quantize(4))
    b = compress_once(as_input_major, Quantize(4))
    assert isinstance(b.model[0], nn.Linear)
    assert b.plan.operators["quantize"]["matrix_as_linear"] is True
    assert torch.equal(_matrix(a.model), _matrix(b.model))
    # each output row of the rounded weight spans at most 2*7+1 levels of its own scale
    rows = _matrix(b.model)
    steps = rows.abs().amax(dim=1, keepdim=True) / 7
    assert torch.allclose(rows / steps, torch.round(rows / steps), atol=1e-4)
    x = torch.randn(16, 64)
    blob = to_bytes(b.model, b.plan)
    assert abs(len(blob) - len(to_bytes(a.model, a.plan))) < 64
    with torch.no_grad():
        assert torch.equal(load_model(io.BytesIO(blob), model=fresh)(x), b.model(x))
        assert torch.equal(load_model(io.BytesIO(blob))(x), b.model(x))


def test_per_channel_files_saved_before_load_as_they_were_made():
    """A per-channel plan from before records neither `group_size` nor `matrix_as_linear`: it replays
    with the layer input-major and one scale per stored row, as it was made."""
    _, as_input_major, fresh = _pair()
    old_way = compress_once(as_input_major, Quantize(4, matrix_as_linear=False))
    assert not isinstance(old_way.model[0], nn.Linear)
    recorded = old_way.plan.to_dict()
    assert recorded["operators"]["quantize"].pop("matrix_as_linear") is False
    assert "group_size" not in recorded["operators"]["quantize"]
    old_plan = Plan.from_dict(recorded)
    assert not old_plan.strategy().operators[0].needs_linear({"bits": 4})
    # the old grid differs from the new one (rows of very different size), so this checks the layout
    assert not torch.equal(_matrix(old_way.model), _matrix(compress_once(as_input_major, Quantize(4)).model))
    x = torch.randn(16, 64)
    loaded = load_model(io.BytesIO(to_bytes(old_way.model, old_plan)), model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), old_way.model(x))
