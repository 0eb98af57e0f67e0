"""Calibrated operators (GPTQ, AWQ scaling, Wanda, SparseGPT), group-wise scales, N:M patterns,
cheap repairs, the .tfz layout of their codes, and what they refuse."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tightfit
from tightfit import ConfigError, Prune, Quantize, compress_once
from tightfit.export.artifact import load_model, to_bytes
from tightfit.operators.prune import WeightMask


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and of very different scales (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5
    scales = torch.logspace(-1, 0.7, features)[torch.randperm(features, generator=g)]
    return (torch.randn(n, features, generator=g) @ (torch.eye(features) + 2 * mixing)) * scales


def _layer(inputs: int = 128, outputs: int = 64, bias: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, outputs, bias=bias)).eval()


def _output_error(model: nn.Module, compressed: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - compressed(x)).pow(2).sum())


@pytest.fixture(scope="module")
def data():
    x = _correlated_inputs(1024, 128)
    return x[:512], x[512:]  # calibration, held out


def _error(model, strategy, calibration, held_out, **kwargs):
    return _output_error(model, compress_once(model, strategy, calibration=calibration, **kwargs).model, held_out)


def test_gptq_beats_round_to_nearest_on_output_error(data):
    cal, held_out = data
    model = _layer()
    for bits, group in ((4, None), (3, 32)):
        rtn = _error(model, Quantize(bits=bits, group_size=group), None, held_out)
        gptq = _error(model, Quantize(bits=bits, group_size=group, method="gptq"), [cal], held_out)
        ordered = _error(model, Quantize(bits=bits, group_size=group, method="gptq", act_order=True), [cal], held_out)
        assert gptq < 0.7 * rtn, (bits, gptq, rtn)
        assert ordered < 0.7 * rtn, (bits, ordered, rtn)


def test_group_scales_and_zero_points_reduce_rounding_error(data):
    cal, held_out = data
    model = _layer()
    with torch.no_grad():  # heavy-tailed weights, as trained ones are: a few large entries per row
        model[0].weight.copy_(torch.distributions.StudentT(2.5).sample(model[0].weight.shape) * 0.05)
    per_channel = _error(model, Quantize(bits=4), None, held_out)
    grouped = _error(model, Quantize(bits=4, group_size=32), None, held_out)
    asymmetric = _error(model, Quantize(bits=4, group_size=32, symmetric=False), None, held_out)
    assert grouped < 0.9 * per_channel
    assert asymmetric < grouped


def test_awq_scaling_is_no_worse_than_round_to_nearest(data):
    cal, held_out = data
    model = _layer()
    rtn = _error(model, Quantize(bits=3, group_size=64), None, cal)
    awq = _error(model, Quantize(bits=3, group_size=64, awq=True), [cal], cal)
    assert awq <= rtn * 1.0001  # alpha = 0 (plain rounding) is in its grid


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude(data, pattern):
    cal, held_out = data
    model = _layer()
    sparsity = None if pattern else 0.5
    magnitude = _error(model, Prune(sparsity, pattern=pattern), None, held_out)
    wanda = _error(model, Prune(sparsity, pattern=pattern, method="wanda"), [cal], held_out)
    sparse_gpt = _error(model, Prune(sparsity, pattern=pattern, method="sparsegpt"), [cal], held_out)
    assert wanda < 0.8 * magnitude, (wanda, magnitude)
    assert sparse_gpt < 0.8 * magnitude, (sparse_gpt, magnitude)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_masks_keep_exactly_n_of_every_m(data, method, pattern):
    cal, _ = data
    n, m = (int(p) for p in pattern.split(":"))
    batches = (b for b in cal.split(128))  # a generator: read once
    result = compress_once(_layer(), Prune(pattern=pattern, method=method), calibration=batches)
    weight = result.model[0].weight.detach()
    nonzeros = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
    assert bool((nonzeros == n).all())
    assert isinstance(result.model[0].parametrizations.weight[0], WeightMask)


def test_group_wise_4_bit_file_is_codes_plus_scales():
    model = _layer(512, 256)
    float_bytes = len(to_bytes(model))
    result = compress_once(model, Quantize(bits=4, group_size=128))
    data = to_bytes(result.model, result.plan)
    expected = 512 * 256 * 4 / 8 + 256 * (512 // 128) * 2  # 4-bit codes + one float16 scale per group
    manifest = __import__("json").loads(__import__("zipfile").ZipFile(io.BytesIO(data)).read("manifest.json"))
    assert [t.get("scale_kind") for t in manifest["tensors"] if t.get("kind") == "int"] == ["f16"]
    assert abs(len(data) - expected) < 0.03 * expected, (len(data), expected)
    assert len(data) < 0.15 * float_bytes


@pytest.mark.parametrize(
    "strategy",
    [
        Quantize(bits=4, method="gptq", group_size=32),
        Quantize(bits=3, method="gptq", group_size=32, symmetric=False, act_order=True),
        Quantize(bits=3, method="gptq", group_size=48, symmetric=False, act_order="groups"),
        Quantize(bits=4, method="gptq", group_size=64, awq=True),
        Quantize(bits=4, group_size=64, awq=True),
        tightfit.Compose([Prune(0.5, method="sparsegpt"), Quantize(bits=4, method="gptq", group_size=32)]),
    ],
)
def test_file_round_trip_reproduces_the_calibrated_model(data, strategy):
    cal, held_out = data
    result = compress_once(_layer(bias=True), strategy, calibration=[cal])
    blob = to_bytes(result.model, result.plan)
    loaded = load_model(io.BytesIO(blob))
    with torch.no_grad():
        assert torch.equal(loaded(held_out), result.model(held_out))
    manifest_kinds = {
        t.get("kind")
        for t in __import__("json").loads(__import__("zipfile").ZipFile(io.BytesIO(blob)).read("manifest.json"))[
            "tensors"
        ]
    }
    assert "int" in manifest_kinds  # stored as codes, not floats


def test_grouped_convolutions_are_calibrated_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1, groups=2),
    ).eval()
    x = torch.randn(64, 8, 8, 8).cumsum(1)  # channels correlated
    rtn = _output_error(model, compress_once(model, Quantize(bits=3)).model, x)
    result = compress_once(model, Quantize(bits=3, method="gptq"), calibration=list(x.split(16)))
    assert not result.uncalibrated
    assert _output_error(model, result.model, x) < 0.8 * rtn
    loaded = load_model(io.BytesIO(to_bytes(result.model, result.plan)))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(6, 8, 3, padding="same"),
        lambda: nn.Conv2d(6, 8, 4, padding="same", dilation=2),  # uneven total: the extra row after
        lambda: nn.Conv2d(6, 8, 3, padding="valid", stride=2),
        lambda: nn.Conv2d(6, 8, 3, padding=(1, 2), padding_mode="reflect"),
        lambda: nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular", groups=3),
        lambda: nn.Conv2d(6, 8, 5, padding=2, padding_mode="replicate", stride=2),
        lambda: nn.Conv1d(6, 8, 4, padding="same"),
        lambda: nn.Conv1d(6, 8, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_convolution_patches_are_padded_as_the_layer_pads_its_input(conv):
    """The unfolded rows times the weight give the layer's own output (bias aside), for every
    padding and padding mode; EfficientNet-style padding='same' layers were left uncalibrated."""
    from tightfit.operators.calibration import LayerView, why_not_calibrated

    torch.manual_seed(0)
    layer = conv().eval()
    x = torch.randn(2, 6, *(9, 10)[: layer.weight.dim() - 2])
    view = LayerView(layer)
    rows = view.rows(x)  # (n, G, columns)
    out = torch.einsum("ngc,grc->ngr", rows, view.matrix()).reshape(rows.shape[0], -1)
    with torch.no_grad():
        expected = layer(x) - layer.bias.reshape(1, -1, *[1] * (x.dim() - 2))
    assert why_not_calibrated(layer) is None
    assert torch.allclose(out, expected.movedim(1, -1).reshape(-1, out.shape[1]), atol=1e-5)
    result = compress_once(nn.Sequential(layer), Quantize(bits=4, method="gptq"), calibration=[x])
    assert not result.uncalibrated


def test_a_layer_whose_inputs_vanish_is_still_compressed_and_the_run_goes_on():
    """Inputs below float32's smallest normal number (a randomly initialised MobileViT's
    transformer blocks read ~1e-23) made every Hessian entry denormal, and GPTQ / SparseGPT
    stopped the whole run; such inputs count as dead (rounded on their own), and a Hessian no
    damping can factor sends its layer to round-to-nearest / magnitude, named with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval()
    tiny = [torch.randn(32, 16) * 1e-23]
    for strategy in (Quantize(bits=4, method="gptq"), Prune(0.5, method="sparsegpt")):
        result = compress_once(model, strategy, calibration=tiny, repair=())
        assert not result.uncalibrated
    nan = [torch.full((32, 16), float("nan"))]
    result = compress_once(model, Quantize(bits=4, method="gptq"), calibration=nan, repair=())
    assert set(result.uncalibrated) == {"0", "1"}
    assert "positive definite" in result.uncalibrated["0"] and "rounded to nearest" in result.uncalibrated["0"]
    assert result.model[0].parametrizations.weight[0].bits == 4


def test_bias_correction_removes_the_mean_output_shift():
    model = _layer(bias=True)
    cal = _correlated_inputs(512, 128) + 1.0  # inputs with a mean: rounding shifts the outputs
    plain = compress_once(model, Quantize(bits=2), calibration=[cal], repair=())
    corrected = compress_once(model, Quantize(bits=2), calibration=[cal], repair=("bias",))
    assert corrected.repaired["bias"] == ["0"]
    with torch.no_grad():
        shift_plain = (model(cal) - plain.model(cal)).mean(0).abs().mean()
        shift_corrected = (model(cal) - corrected.model(cal)).mean(0).abs().mean()
    assert shift_corrected < 1e-3 * max(1.0, float(shift_plain)) and shift_plain > 1e-2


def test_batchnorm_reestimation_restores_accuracy_of_a_pruned_cnn(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(3):
        for xb, yb in zip(digits.x_train.split(128), digits.y_train.split(128)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()

    def accuracy(m):
        with torch.no_grad():
            return float((m(digits.x_test).argmax(1) == digits.y_test).float().mean())

    strategy = Prune(0.7, layers=["1", "4"])
    pruned = compress_once(model, strategy).model
    repaired = compress_once(model, strategy, calibration=list(digits.x_train[:512].split(128)))
    assert repaired.repaired["batchnorm"] == ["2", "5"]
    print("accuracy float / pruned / BN re-estimated:", accuracy(model), accuracy(pruned), accuracy(repaired.model))
    assert accuracy(repaired.model) > accuracy(pruned) + 0.03, (
        accuracy(pruned),
        accuracy(repaired.model),
        accuracy(model),
    )


def test_calibrated_methods_are_refused_without_data():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ConfigError, match="calibration"):
        compress_once(mlp, Quantize(bits=4, method="gptq"))
    with pytest.raises(ConfigError, match="calibration"):
        compress_once(mlp, Prune(0.5, method="wanda"), calibration=[])
    with pytest.raises(ConfigError, match="iterable"):
        compress_once(mlp, Prune(0.5, method="wanda"), calibration=torch.randn(64, 64))
    with pytest.raises(ConfigError, match="calibration="):
        tightfit.compress(mlp, evaluate=lambda m: 1.0, strategy=Quantize(bits=4, method="gptq"), budget=1)
    with pytest.raises(ConfigError, match="calibration data"):
        tightfit.apply(
            tightfit.Plan.from_strategy(
                tightfit.Compose([Quantize(4, method="gptq")]), {"1": {"quantize": {"bits": 4}}}
            ),
            mlp,
        )


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="method"):
        Quantize(4, method="awq")
    with pytest.raises(ConfigError, match="group_size"):
        Quantize(4, group_size=1)
    with pytest.raises(ConfigError, match="percdamp"):
        Quantize(4, method="gptq", percdamp=0)
    with pytest.raises(ConfigError, match="act_order"):
        Quantize(4, method="gptq", act_order="weight")
    with pytest.raises(ConfigError, match="pattern"):
        Prune(pattern="4:2")
    with pytest.raises(ConfigError, match="pattern"):
        Prune(0.3, pattern="2:4")
    with pytest.raises(ConfigError, match="ranges or choices"):
        compress_once(_layer(), Quantize(bits=(4, 8)))
    with pytest.raises(ConfigError, match="repair"):
        compress_once(_layer(), Quantize(bits=4), calibration=[torch.randn(4, 128)], repair=("dropout",))


def test_layers_the_calibrated_methods_cannot_read_are_named_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 16)).eval()
    tokens = torch.randint(0, 50, (64, 8))
    result = compress_once(model, Quantize(bits=4, method="gptq"), calibration=[tokens])
    assert set(result.uncalibrated) == {"0"} and "input activations" in result.uncalibrated["0"]
    assert result.model[0].parametrizations.weight[0].bits == 4  # rounded to nearest instead
    assert result.calibration_passes == 1


def test_group_size_is_searchable_and_recorded_in_the_plan():
    op = Quantize(bits=(4, 8), group_size=(None, 32, 128))
    layer = tightfit.measure.analysis.analyze(_layer()).layers[0]
    hps = {hp.name: hp.choices for hp in op.hyperparameters(layer)}
    assert hps == {"bits": (4, 8), "group_size": (0, 32, 128)}
    again = Quantize(**op.config())
    assert again.group_sizes == op.group_sizes
    # plans made before group-wise scales are unchanged: only `bits`
    assert Quantize(bits=4).identity() == {"bits": 32}


class _InputMajor(nn.Module):
    """A matrix layer stored input-major, as Hugging Face GPT-2's Conv1D: ``x @ W + b``."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) * 0.1)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_input_major_matrix_layers_run_as_linears_and_load_into_a_fresh_model(data):
    cal, held_out = data
    torch.manual_seed(0)
    model = nn.Sequential(_InputMajor(128, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    rtn = _output_error(model, compress_once(model, Quantize(bits=3, group_size=32)).model, held_out)
    result = compress_once(model, Quantize(bits=3, method="gptq", group_size=32), calibration=[cal])
    assert isinstance(result.model[0], nn.Linear) and not result.uncalibrated
    assert _output_error(model, result.model, held_out) < 0.8 * rtn
    fresh = nn.Sequential(_InputMajor(128, 32), nn.ReLU(), nn.Linear(32, 8))
    loaded = load_model(io.BytesIO(to_bytes(result.model, result.plan)), model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(held_out), result.model(held_out))


def test_gptq_layer_computes_exactly_the_solvers_codes(data):
    from tightfit.operators.solvers import gptq

    cal, _ = data
    model = _layer()
    result = compress_once(model, Quantize(bits=3, method="gptq", group_size=32), calibration=list(cal.split(128)))
    hessian = (2 * cal.T @ cal / cal.shape[0])[None]
    expected, _, _ = gptq(model[0].weight.detach()[None], hessian, 3, group_size=32)
    assert torch.allclose(result.model[0].weight, expected[0], atol=1e-5)


def test_each_layer_is_calibrated_on_the_outputs_of_the_compressed_layers_before_it(data, monkeypatch):
    import tightfit.operators.calibrated as calibrated

    cal, _ = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    seen = []
    original = calibrated.collect_stats

    def recording(model_, view, batches, **kwargs):
        stats = original(model_, view, batches, **kwargs)
        seen.append((view.module, stats))
        return stats

    monkeypatch.setattr(calibrated, "collect_stats", recording)
    result = compress_once(model, Quantize(bits=2, method="gptq"), calibration=[cal])
    assert [id(m) for m, _ in seen] == [id(result.model[0]), id(result.model[2])]
    assert result.calibration_passes == 2
    with torch.no_grad():  # what the last layer saw during calibration: the compressed first layer's outputs
        compressed_inputs = torch.relu(result.model[0](cal))
        float_inputs = torch.relu(model[0](cal))
    last = seen[1][1]
    assert torch.allclose(last.mean[0], compressed_inputs.mean(0), atol=1e-5)
    assert not torch.allclose(last.mean[0], float_inputs.mean(0), atol=1e-3)
    assert torch.allclose(last.hessian[0], 2 * compressed_inputs.T @ compressed_inputs / len(cal), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_reads_each_layer_with_the_batchnorm_statistics_it_will_have(method, monkeypatch):
    """Before a layer's statistics are gathered, the BatchNorms are re-estimated on the model as
    compressed so far, as the final repair will leave them; quantization alone skips the passes."""
    import tightfit.operators.calibrated as calibrated

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    ).eval()
    with torch.no_grad():  # stored statistics unlike the data's, as after training on other inputs
        model[1].running_mean.fill_(3.0)
        model[4].running_var.fill_(9.0)
    x = torch.randn(32, 3, 8, 8)
    seen = {}
    original = calibrated.collect_stats

    def recording(model_, view, batches, **kwargs):
        seen[id(view.module)] = model_[1].running_mean.clone()
        return original(model_, view, batches, **kwargs)

    monkeypatch.setattr(calibrated, "collect_stats", recording)
    result = compress_once(model, Prune(0.5, method=method), calibration=[x])
    first = result.model[0]
    with torch.no_grad():  # the first layer's compressed outputs: what its BatchNorm should describe
        expected = first(x).mean((0, 2, 3))
    assert torch.allclose(seen[id(result.model[3])], expected, atol=1e-5)
    # the passes end at the layer they prepare: a BatchNorm after it waits, reset, for its own turn
    assert torch.equal(seen[id(first)], torch.zeros(8))
    assert torch.allclose(result.model[1].running_mean, expected, atol=1e-5)  # and the final repair
    assert result.calibration_passes == 2 + 2 + 1  # two layers, a re-estimation before each, the repair
    assert result.blocks_not_cached.startswith("BatchNorm statistics are re-estimated")

    quantized = compress_once(model, Quantize(bits=4, method="gptq"), calibration=[x])
    assert quantized.calibration_passes == 2 + 1


def test_layers_no_operator_takes_are_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 8)).eval()  # 30 inputs: no 4-groups
    result = compress_once(model, Prune(pattern="2:4", method="sparsegpt"), calibration=[torch.randn(32, 64)])
    assert set(result.left_alone) == {"2"} and "multiple of 4" in result.left_alone["2"]
    assert "2" not in result.plan.layers


def test_scales_below_float16_range_are_stored_as_float32_and_round_trip():
    model = _layer(64, 16)
    with torch.no_grad():
        model[0].weight.mul_(1e-5)  # scales ~1e-6: below float16's normal range
    result = compress_once(model, Quantize(bits=4, group_size=16))
    blob = to_bytes(result.model, result.plan)
    manifest = __import__("json").loads(__import__("zipfile").ZipFile(io.BytesIO(blob)).read("manifest.json"))
    assert [t.get("scale_kind") for t in manifest["tensors"] if t.get("kind") == "int"] == ["f32"]
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(load_model(io.BytesIO(blob))(x), result.model(x))


class _Tokens(nn.Module):
    """A toy token model called as Hugging Face models are, with ``input_ids`` and ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.embed(input_ids))))


def test_padding_tokens_are_left_out_of_the_calibration_statistics():
    from tightfit.operators.calibration import LayerView, collect_stats

    model = _Tokens().eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])  # the second sentence padded with token 0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    def stats(batches):
        return collect_stats(model, LayerView(model.proj), batches, gram=True, stop_early=False)

    padded = stats([{"input_ids": ids, "attention_mask": mask}])
    real = stats([{"input_ids": ids[:1]}, {"input_ids": ids[1:, :2]}])  # each sentence alone, no padding
    assert padded.count == real.count == 6
    assert torch.allclose(padded.hessian, real.hessian) and torch.allclose(padded.mean, real.mean)
    assert stats([{"input_ids": ids}]).count == 8  # no mask: every position is an input

    # end to end: what the padding positions hold does not change GPTQ's weights
    other = ids.masked_fill(mask == 0, 7)
    a, b = (
        compress_once(model, Quantize(3, method="gptq", group_size=8), [{"input_ids": x, "attention_mask": mask}]).model
        for x in (ids, other)
    )
    assert torch.equal(a.proj.weight, b.proj.weight) and torch.equal(a.out.weight, b.out.weight)
    unmasked = compress_once(model, Quantize(3, method="gptq", group_size=8), [{"input_ids": other}]).model
    assert not torch.equal(unmasked.proj.weight, b.proj.weight)


def test_act_order_by_groups_keeps_groups_contiguous_and_helps_with_outlier_inputs():
    from tightfit.operators.solvers import column_order, gptq, output_error

    g = torch.Generator().manual_seed(1)
    x = _correlated_inputs(700, 200, seed=1)
    x[:, 150] *= 40 / x[:, 150].std()  # one outlier feature, as transformers' LayerNorm outputs have
    hessian = (2 * x.T @ x / len(x))[None]
    diag = torch.diagonal(hessian[0])
    order = column_order(hessian, 64, "groups")[0]
    groups = (order // 64).tolist()
    # whole groups: the outlier's group first, the partial last group (192..199) last; within a group, largest first
    assert groups[:64] == [2] * 64 and groups[-8:] == [3] * 8
    assert sum(a != b for a, b in zip(groups, groups[1:])) == 3
    assert int(order[0]) == 150 and torch.all(diag[order[:64]].diff() <= 0)

    weight = torch.randn(1, 48, 200, generator=g)
    errors = {}
    for act_order in (False, "groups"):
        q, scale, _ = gptq(weight, hessian, 3, group_size=64, act_order=act_order)
        errors[act_order] = output_error(weight, q, hessian)
        # the codes sit on the grid the file stores: contiguous groups, one scale each
        codes = q[0] / scale[0].repeat_interleave(64, dim=1)[:, :200]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 3
    assert errors["groups"] < 0.9 * errors[False], errors
