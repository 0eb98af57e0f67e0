import io

import numpy as np
import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ArtifactError
from tightfit.export import codec, read_manifest, to_bytes
from tightfit.operators import Compose, Plan, Prune, Quantize, apply

LAYERS = ["1", "3", "5"]


def _compressed(mlp, sparsity=0.8, bits=4):
    strategy = Compose([Prune(), Quantize(bits=(2, 4, 8, 16))])
    plan = Plan.from_strategy(
        strategy, {n: {"prune": {"sparsity": sparsity}, "quantize": {"bits": bits}} for n in LAYERS}
    )
    return apply(plan, mlp), plan


@pytest.mark.parametrize("density", [1.0, 0.6, 0.2, 0.02, 0.0])
@pytest.mark.parametrize("kind,bits", [("f32", 32), ("f16", 16), ("int", 4), ("int", 2), ("int", 8)])
def test_codec_round_trip_every_layout(density, kind, bits):
    rng = np.random.default_rng(0)
    n = 3001
    if kind == "int":
        qmax = 2 ** (bits - 1) - 1
        values = rng.integers(-qmax, qmax + 1, n)
    else:
        values = rng.standard_normal(n).astype(np.float32 if kind == "f32" else np.float16)
    values[rng.random(n) >= density] = 0
    meta, data = codec.encode(values, kind, bits)
    decoded = codec.decode(meta, data)
    assert np.array_equal(decoded.astype(values.dtype), values)


def test_sparse_layouts_win_when_sparse():
    values = np.zeros(10000, dtype=np.float32)
    values[::50] = 1.0
    meta, data = codec.encode(values, "f32", 32)
    assert meta["layout"] in {"gap", "bitmask"}
    assert len(data) < 0.1 * values.nbytes


def test_save_load_reproduces_outputs_exactly_and_size_is_the_file(mlp, digits, tmp_path):
    compressed, plan = _compressed(mlp)
    path = tmp_path / "m.tfz"
    size = tightfit.save(compressed, path, plan=plan)
    assert size == path.stat().st_size
    assert size == len(to_bytes(compressed, plan))
    loaded = tightfit.load(path)
    x = digits.x_test
    assert torch.equal(loaded(x), compressed.eval()(x))
    assert read_manifest(path)["plan"] == plan.to_dict()


def test_saved_file_stores_what_compression_removed(mlp, tmp_path):
    dense_bytes = tightfit.save(mlp, tmp_path / "dense.tfz")
    small, plan = _compressed(mlp, sparsity=0.9, bits=4)
    small_bytes = tightfit.save(small, tmp_path / "small.tfz", plan=plan)
    # 90% zeros at 4 bits: values alone are 1/80 of float32; indices and biases add some.
    assert small_bytes < dense_bytes / 12


def test_load_into_a_given_model_unpickles_no_code(mlp, digits, tmp_path):
    compressed, plan = _compressed(mlp)
    path = tmp_path / "m.tfz"
    tightfit.save(compressed, path, plan=plan)
    fresh = tightfit.demo.lenet_300_100()
    loaded = tightfit.load(path, model=fresh)
    assert torch.equal(loaded(digits.x_val), compressed.eval()(digits.x_val))


def test_loading_into_the_wrong_model_is_a_clear_error(mlp, tmp_path):
    compressed, plan = _compressed(mlp)
    path = tmp_path / "m.tfz"
    tightfit.save(compressed, path, plan=plan)
    wrong = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    with pytest.raises(ArtifactError, match="shape"):
        tightfit.load(path, model=wrong)


def test_not_a_model_file(tmp_path):
    bogus = tmp_path / "x.tfz"
    bogus.write_bytes(b"hello")
    with pytest.raises(ArtifactError, match="not a tightfit model file"):
        tightfit.load(bogus)


class _WithEverything(nn.Module):
    """BatchNorm buffers, a non-persistent buffer, tied weights, an int buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)
        h = self.bn(self.conv(h)).transpose(1, 2)
        return self.head(h * self.scale)


def test_round_trip_keeps_buffers_ties_and_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = _WithEverything()
    model.train()
    model(torch.randint(0, 20, (4, 6)))  # move BN running stats
    model.eval()
    strategy = Compose([Prune(), Quantize(bits=(4,))])
    plan = Plan.from_strategy(strategy, {"conv": {"prune": {"sparsity": 0.5}, "quantize": {"bits": 4}}})
    compressed = apply(plan, model)
    path = tmp_path / "m.tfz"
    tightfit.save(compressed, path, plan=plan)
    with pytest.raises(ArtifactError, match="model="):  # a user's class: its forward is code, not data
        tightfit.load(path)
    loaded = tightfit.load(path, model=_WithEverything())
    tokens = torch.randint(0, 20, (3, 6))
    assert torch.equal(loaded(tokens), compressed(tokens))
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded.bn.running_mean, model.bn.running_mean)
    manifest = read_manifest(path)
    assert any("alias_of" in t for t in manifest["tensors"])


def test_result_save_writes_the_reported_bytes(mlp, digits, tmp_path):
    result = tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Compose([Prune(sparsity=(0.3, 0.6)), Quantize(bits=(8,))]),
        constraint=tightfit.MaxDrop(0.05),
        budget=3,
        search="random",
    )
    assert result.feasible
    path = tmp_path / "r.tfz"
    assert tightfit.save(result, path) == result.size_bytes == path.stat().st_size
    buffer = io.BytesIO(path.read_bytes())
    assert torch.equal(tightfit.load(buffer)(digits.x_val), result.model(digits.x_val))
