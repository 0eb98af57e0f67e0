"""Recurrent layers (nn.LSTM / nn.GRU / nn.RNN): their weight matrices are pruned and quantized for
real, i.e. in the forward pass, through fine-tuning, copies, the saved file and the export; what is
not built is left alone with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tightfit
from tightfit.operators import Compose, Int8, LowRank, Plan, Prune, Quantize, StructuredPrune, int8_layers

HIDDEN = 32


class SequenceClassifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, **rnn_args):
        super().__init__()
        self.rnn = cell(3, HIDDEN, batch_first=True, **rnn_args)
        width = rnn_args.get("proj_size") or HIDDEN
        self.head = nn.Linear(width * (2 if rnn_args.get("bidirectional") else 1), 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sequences of 8 steps; the class is whether the first channel rises or falls over time."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    slope = (labels.float() * 2 - 1)[:, None] * torch.linspace(-1, 1, 8)
    x = 0.5 * torch.randn(n, 8, 3, generator=generator)
    x[:, :, 0] += slope
    return x, labels


def untrained(cell, **rnn_args) -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(cell, **rnn_args).eval()


def trained(cell, **rnn_args) -> SequenceClassifier:
    """Trained briefly (a few Adam steps): accurate enough for an accuracy constraint to mean something."""
    model = untrained(cell, **rnn_args).train()
    x, y = sequences(64, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(15):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def with_weights_of(compressed: nn.Module, cell, **rnn_args) -> nn.Module:
    """A fresh, unparametrized model holding ``compressed``'s effective weights."""
    fresh = SequenceClassifier(cell, **rnn_args).eval()
    with torch.no_grad():
        for name, value in compressed.state_dict().items():
            if "parametrizations" not in name:
                fresh.get_parameter(name).copy_(value)
        for name in compressed.rnn._flat_weights_names:
            getattr(fresh.rnn, name).copy_(getattr(compressed.rnn, name))
    return fresh


def plan(**per_op) -> Plan:
    ops = {"prune": Prune(), "quantize": Quantize(), "int8": Int8()}
    return Plan.from_strategy(Compose([ops[name] for name in per_op]), {"rnn": per_op})


RECURRENT = [
    (nn.LSTM, {}),
    (nn.GRU, {}),
    (nn.RNN, {}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"proj_size": 5}),
]


@pytest.mark.parametrize("cell, rnn_args", RECURRENT)
def test_every_weight_matrix_is_pruned_in_the_forward(cell, rnn_args):
    model = untrained(cell, **rnn_args)
    x, _ = sequences(16, seed=2)
    pruned = tightfit.apply(plan(prune={"sparsity": 0.6}), model)
    names = [n for n in model.rnn._flat_weights_names if n.startswith("weight_")]
    assert sorted(pruned.rnn.parametrizations) == sorted(names)  # _reverse, _l1 and weight_hr_l0 included
    for name in names:
        assert float((getattr(pruned.rnn, name) == 0).float().mean()) == pytest.approx(0.6, abs=0.02), name
    with torch.no_grad():
        got = pruned(x)
        assert torch.allclose(got, with_weights_of(pruned, cell, **rnn_args)(x), atol=1e-6)
        assert not torch.allclose(got, model(x), atol=1e-3)  # the zeros change what it computes


def test_a_pruned_lstm_computes_the_lstm_equations_with_the_zeros():
    model = untrained(nn.LSTM)
    x, _ = sequences(4, seed=3)
    lstm = tightfit.apply(plan(prune={"sparsity": 0.5}, quantize={"bits": 4}), model).rnn
    w_ih, w_hh, b = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
    h = c = torch.zeros(4, HIDDEN)
    with torch.no_grad():
        for t in range(x.shape[1]):
            i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        assert torch.allclose(lstm(x)[0][:, -1], h, atol=1e-5)


def test_masks_hold_through_training_and_the_model_still_copies():
    model = untrained(nn.LSTM, num_layers=2, bidirectional=True)
    x, y = sequences(32, seed=4)
    pruned = tightfit.apply(plan(prune={"sparsity": 0.7}), model).train()
    masks = {name: chain[0].mask.clone() for name, chain in pruned.rnn.parametrizations.items()}
    tightfit.FineTune([(x, y)] * 3, epochs=2, lr=1e-2)(pruned)  # six Adam steps through the masks
    for name, mask in masks.items():
        weight = getattr(pruned.rnn, name)
        assert torch.all(weight[mask == 0] == 0), name
    before = tightfit.apply(plan(prune={"sparsity": 0.7}), model)
    assert not torch.equal(pruned.rnn.weight_hh_l1, before.rnn.weight_hh_l1)  # it trained
    # the forward of a training step left computed tensors in the layer; copies still work and agree
    pruned(x).sum().backward()
    twin = copy.deepcopy(pruned).eval()
    pruned.eval()
    with torch.no_grad():
        expected = with_weights_of(pruned, nn.LSTM, num_layers=2, bidirectional=True)(x)
        assert torch.allclose(pruned(x), expected, atol=1e-6) and torch.allclose(twin(x), expected, atol=1e-6)


@pytest.mark.parametrize("recovery", [tightfit.LearningCompression, tightfit.GradualPrune])
def test_recovery_that_refits_masks_and_grids_keeps_the_layer_computing_with_them(recovery):
    model = untrained(nn.GRU, num_layers=2, bidirectional=True)
    x, y = sequences(32, seed=4)
    compressed = tightfit.apply(plan(prune={"sparsity": 0.7}, quantize={"bits": 4}), model).train()
    recovery([(x, y)] * 2, epochs=2)(compressed)
    compressed.eval()
    with torch.no_grad():
        assert torch.allclose(
            compressed(x), with_weights_of(compressed, nn.GRU, num_layers=2, bidirectional=True)(x), atol=1e-6
        )
        for name in compressed.rnn.parametrizations:
            weight = getattr(compressed.rnn, name)
            assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01), name
            assert max(len(row.abs().unique()) for row in weight) <= 8, name  # 4 bits: 0 and 7 magnitudes per row


@pytest.mark.parametrize("cell, rnn_args", [(nn.LSTM, {}), (nn.GRU, {"num_layers": 2, "bidirectional": True})])
def test_the_saved_file_shrinks_and_reloads_the_same_outputs(cell, rnn_args, tmp_path):
    model = untrained(cell, **rnn_args)
    x, _ = sequences(16, seed=5)
    the_plan = plan(prune={"sparsity": 0.75}, quantize={"bits": 4})
    compressed = tightfit.apply(the_plan, model).eval()
    dense = tightfit.save(model, tmp_path / "dense.tfz")
    small = tightfit.save(compressed, tmp_path / "small.tfz", plan=the_plan)
    assert small < dense / 3  # biases and the architecture stay as they were
    with torch.no_grad():
        expected = compressed(x)
        for loaded in (tightfit.load(tmp_path / "small.tfz", model=model),):  # a user class: loaded into an instance
            assert torch.equal(loaded(x), expected)
            assert torch.equal(with_weights_of(loaded, cell, **rnn_args)(x), expected)  # not stale _flat_weights
            assert float((loaded.rnn.weight_hh_l0 == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_compress_takes_a_recurrent_classifier(cell, tmp_path):
    model = trained(cell)
    x_val, y_val = sequences(64, seed=6)
    x_train, y_train = sequences(64, seed=7)
    strategy = Compose([Prune(sparsity=0.5), Quantize(bits=(4, 8)), Int8()])
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy([(x_val, y_val)]),
        strategy=strategy,
        constraint=tightfit.MaxDrop(1.0),
        finetune=tightfit.FineTune([(x_train, y_train)], epochs=1, lr=1e-3),
        budget=3,
        search="random",
        example_input=x_val[:2],
        seed=0,
        run_dir=tmp_path / "run",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    assert "prune" in result.plan.layers["rnn"] and "rnn" not in {s.name for s in result.left_alone}
    assert result.size_bytes < result.baseline_size_bytes / 2
    with torch.no_grad():
        assert float((result.model.rnn.weight_ih_l0 == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=model)
        assert torch.equal(loaded(x_val), result.model(x_val))
    if cell is nn.GRU:  # int8 has an ONNX Runtime kernel for LSTM only
        assert "int8" not in result.plan.layers["rnn"]
        assert any("DynamicQuantizeLSTM" in note for note in _reasons(model, Int8()).values())


def _reasons(model, strategy) -> dict[str, str]:
    x, _ = sequences(4, seed=0)
    result = tightfit.compress(
        model,
        evaluate=lambda m: 0.0,
        strategy=strategy,
        constraint=tightfit.MaxDrop(1.0),
        budget=1,
        search="random",
        example_input=x,
    )
    return {s.name: s.reason for s in result.left_alone}


def test_what_is_not_built_for_recurrent_layers_is_left_alone_with_the_reason():
    lstm, gru = SequenceClassifier(nn.LSTM).eval(), SequenceClassifier(nn.GRU).eval()
    layer = tightfit.analyze(lstm).layer("rnn")
    assert not StructuredPrune().supports(layer) and "hidden units" in StructuredPrune().why_not(layer)
    assert not LowRank().supports(layer) and "gate matrices" in LowRank().why_not(layer)
    assert "no int8 GRU" in _reasons(gru, Int8())["rnn"]
    assert "proj_size" in _reasons(SequenceClassifier(nn.LSTM, proj_size=5).eval(), Int8())["rnn"]


@pytest.mark.parametrize("rnn_args", [{}, {"num_layers": 2, "bidirectional": True}])
@pytest.mark.onnx
def test_a_pruned_lstm_exports_to_onnx_and_runs_in_int8(rnn_args, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    model = untrained(nn.LSTM, **rnn_args)
    x, _ = sequences(8, seed=8)
    compressed = tightfit.apply(plan(prune={"sparsity": 0.5}, int8={"int8": True}), model).eval()
    assert int8_layers(compressed) == ["rnn"]
    floating = tightfit.export_model(compressed, x, tmp_path / "float.onnx")  # checks outputs within 1e-4
    int8 = tightfit.export_model(compressed, x, tmp_path / "int8.onnx", int8="dynamic", int8_layers=["rnn"], rtol=0.05)
    ops = {node.op_type for node in onnx.load(int8.path).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert int8.size_bytes < floating.size_bytes / 2


def test_the_layer_counts_every_weight_matrix():
    model = SequenceClassifier(nn.LSTM, num_layers=2, bidirectional=True)
    layer = tightfit.analyze(model).layer("rnn")
    matrices = [p for n, p in model.rnn.named_parameters() if n.startswith("weight_")]
    assert layer.kind == "LSTM" and layer.weight_params == sum(p.numel() for p in matrices) and len(matrices) == 8
