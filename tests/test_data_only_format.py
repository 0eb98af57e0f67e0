"""The .tfz format unpickles nothing: a model of torch.nn classes is rebuilt from its architecture
stored as data; any other model loads into a given instance (``model=`` / ``factory=``); a format-1
file's pickle is never read (it loads into a given model); float16 and bfloat16 models keep their dtype
and store quantized weights as codes."""

import importlib.util
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ArtifactError
from tightfit.export import read_manifest, to_bytes
from tightfit.operators import Compose, Plan, Prune, Quantize, apply

ROOT = Path(__file__).resolve().parents[1]


def _compressed(
    model, sparsity=0.6, bits=4, kinds=("Linear", "Conv2d", "Conv1d", "ConvTranspose2d", "Embedding", "LSTM")
):
    """``model`` with some of its layers pruned and quantized, and the plan."""
    layers = [layer.name for layer in tightfit.analyze(model).layers if layer.kind in kinds][:4]
    strategy = Compose([Prune(), Quantize(bits=(bits,))])
    plan = Plan.from_strategy(
        strategy, {n: {"prune": {"sparsity": sparsity}, "quantize": {"bits": bits}} for n in layers}
    )
    return apply(plan, model).eval(), plan


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _nn_models():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(6, 3),
    )
    cnn.train()
    cnn(torch.randn(8, 1, 8, 8))  # running statistics that differ from the defaults
    return {
        "mlp": (
            nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)),
            torch.randn(5, 8),
        ),
        "cnn_batchnorm": (cnn, torch.randn(2, 1, 8, 8)),
        "embedding_layernorm": (
            nn.Sequential(
                nn.Embedding(40, 16, padding_idx=0),
                nn.LayerNorm(16),
                nn.Linear(16, 16),
                nn.SiLU(),
                nn.LayerNorm(16, eps=1e-6, bias=False),
                nn.Linear(16, 5),
            ),
            torch.randint(0, 40, (3, 7)),
        ),
        "lstm": (nn.LSTM(6, 12, num_layers=2, batch_first=True, bidirectional=True), torch.randn(2, 5, 6)),
        "modules_containers": (
            nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.ModuleDict({"a": nn.GRU(4, 3)})]),
            None,
        ),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm", "embedding_layernorm", "lstm"])
@pytest.mark.parametrize("compress", [False, True])
def test_torch_nn_models_load_without_the_model(name, compress, tmp_path):
    model, x = _nn_models()[name]
    model.eval()
    plan = None
    if compress:
        model, plan = _compressed(model)
    path = tmp_path / "m.tfz"
    tightfit.save(model, path, plan=plan)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["architecture.json", "manifest.json", "payload.bin"]
    loaded = tightfit.load(path)
    assert type(loaded) is type(tightfit.export.bake(model)) and not loaded.training
    with torch.no_grad():
        assert torch.equal(_first(loaded(x)), _first(model(x)))
    assert set(loaded.state_dict()) == set(tightfit.export.bake(model).state_dict())


def test_nothing_is_unpickled_when_loading(monkeypatch, tmp_path):
    model, x = _nn_models()["cnn_batchnorm"]
    model, plan = _compressed(model.eval())
    path = tmp_path / "m.tfz"
    tightfit.save(model, path, plan=plan)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    class Refusing(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    with torch.no_grad():
        assert torch.equal(tightfit.load(path)(x), model(x))


def test_containers_and_tied_weights_round_trip(tmp_path):
    model, _ = _nn_models()["modules_containers"]
    tied = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 12, bias=False))
    tied[1].weight = tied[0].weight
    for m in (model, tied):
        tightfit.save(m, tmp_path / "m.tfz")
        loaded = tightfit.load(tmp_path / "m.tfz")
        assert [(n, type(s)) for n, s in loaded.named_modules()] == [(n, type(s)) for n, s in m.named_modules()]
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))
    assert loaded[1].weight is loaded[0].weight
    x = torch.randint(0, 12, (2, 3))
    assert torch.equal(loaded(x), tied(x))


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x)) * 2


def make_user_net():
    torch.manual_seed(1)
    return UserNet()


def test_a_user_class_needs_model_or_factory(tmp_path):
    model, plan = _compressed(make_user_net())
    path = tmp_path / "m.tfz"
    tightfit.save(model, path, plan=plan)
    manifest = read_manifest(path)
    assert manifest["architecture"] is None and "UserNet" in manifest["architecture_error"]
    with pytest.raises(ArtifactError, match=r"model=.*factory="):
        tightfit.load(path)
    x = torch.randn(4, 8)
    for loaded in (
        tightfit.load(path, model=make_user_net()),
        tightfit.load(path, factory=make_user_net),
        tightfit.load(path, factory=f"{__name__}:make_user_net"),
    ):
        assert torch.equal(loaded(x), model(x))


def test_edited_layers_and_hooks_are_not_stored_as_data(tmp_path):
    """A layer that differs from what its constructor arguments build is not rebuilt wrong."""
    edited = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    edited[1].forward = lambda x: x * 3  # an instance forward: code
    hooked = nn.Sequential(nn.Linear(4, 4))
    hooked[0].register_forward_hook(lambda module, args, out: out * 2)
    subclass = nn.Sequential(type("MyLinear", (nn.Linear,), {})(4, 4))
    for model in (edited, hooked, subclass):
        path = tmp_path / "m.tfz"
        tightfit.save(model, path)
        assert read_manifest(path)["architecture"] is None
        with pytest.raises(ArtifactError, match="model="):
            tightfit.load(path)


def test_structural_plans_load_from_data_and_into_a_given_model(tmp_path):
    from tightfit.search.space import build_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(6, 16)
    for op in (tightfit.LowRank(rank_ratio=0.25), tightfit.StructuredPrune(ratio=0.5)):
        op.prepare(model, x)
        space = build_space(Compose([op]), tightfit.analyze(model))
        plan = space.plan({k: 0.5 if op.name == "structured_prune" else 0.25 for k in space.keys})
        compressed = apply(plan, model).eval()
        assert [type(m) for m in compressed.modules()] != [type(m) for m in model.modules()] or compressed[
            0
        ].out_features < 32  # the structure changed
        tightfit.save(compressed, tmp_path / "s.tfz", plan=plan)
        for loaded in (tightfit.load(tmp_path / "s.tfz"), tightfit.load(tmp_path / "s.tfz", model=model)):
            assert torch.equal(loaded(x), compressed(x))
            assert [type(m) for m in loaded.modules()] == [type(m) for m in compressed.modules()]


def _as_format_1(data: bytes, model: nn.Module) -> bytes:
    """The same file as tightfit 0.x wrote it: version 1, the architecture a pickled meta module."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        payload = archive.read("payload.bin")
    manifest.update(version=1, architecture=True)
    manifest.pop("payload_bytes")
    pickled = io.BytesIO()
    torch.save(tightfit.export.bake(model).to("meta"), pickled)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        archive.writestr("payload.bin", payload)
        archive.writestr("architecture.pt", pickled.getvalue())
    return out.getvalue()


def test_format_1_files_load_only_into_a_given_model(tmp_path):
    model, plan = _compressed(make_user_net())
    path = tmp_path / "old.tfz"
    path.write_bytes(_as_format_1(to_bytes(model, plan), model))
    x = torch.randn(4, 8)
    with pytest.raises(ArtifactError, match=r"never unpickles") as refused:
        tightfit.load(path)
    assert "model=" in str(refused.value)
    assert torch.equal(tightfit.load(path, model=make_user_net())(x), model(x))
    with pytest.raises(TypeError, match="trust_code"):  # the option to unpickle is gone
        tightfit.load(path, trust_code=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_store_codes_and_keep_their_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype).eval()
    x = torch.randn(4, 64, dtype=dtype)
    plain = tightfit.save(model, tmp_path / "plain.tfz")
    sizes = {}
    for bits in (2, 8):
        strategy = Compose([Quantize(bits=(bits,))])
        plan = Plan.from_strategy(strategy, {n: {"quantize": {"bits": bits}} for n in ("0", "2")})
        quantized = apply(plan, model).eval()
        sizes[bits] = tightfit.save(quantized, tmp_path / f"q{bits}.tfz", plan=plan)
        stored = {t["name"]: t for t in read_manifest(tmp_path / f"q{bits}.tfz")["tensors"]}
        assert stored["0.weight"]["kind"] == "int" and stored["0.weight"]["bits"] == bits
        loaded = tightfit.load(tmp_path / f"q{bits}.tfz")
        assert loaded[0].weight.dtype == dtype and loaded[0].bias.dtype == dtype
        assert torch.equal(loaded(x), quantized(x))
    # 8-bit codes: 0.69x the float16 file here (deflate shrinks float16 values too); they were float16 before, larger
    assert sizes[8] < 0.75 * plain and sizes[2] < sizes[8]


def test_bfloat16_two_bit_search_trials_complete():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(torch.bfloat16).eval()
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    reference = model(x).float()

    def fidelity(m):
        with torch.no_grad():
            return -float((m(x).float() - reference).abs().mean())

    result = tightfit.compress(
        model,
        evaluate=fidelity,
        strategy=Quantize(bits=2),
        constraint=tightfit.MaxDrop(10.0),
        budget=2,
        search="random",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    assert result.feasible and result.model[0].weight.dtype == torch.bfloat16


def _load_module(name: str, path: Path, prefix: str | None = None):
    """A benchmark's models: hf_models has a guarded main; torch_models runs its sweep at import,
    so only its class definitions (the source before ``cases = [``) are executed."""
    if prefix is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    namespace: dict = {"__name__": name}
    exec(compile(path.read_text().split(prefix)[0], str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    "name", ["MobileNetish", "UNetish", "LSTMClassifier", "Tied", "DictOut", "Conv1dNet", "SmallTransformer"]
)
def test_unseen_torch_models_round_trip_with_model(name, tmp_path):
    classes = _load_module("torch_models_classes", ROOT / "benchmarks" / "torch_models.py", "\ncases = [")
    torch.manual_seed(0)
    model = classes[name]().eval()
    inputs = {
        "MobileNetish": torch.randn(2, 3, 16, 16),
        "UNetish": torch.randn(2, 3, 16, 16),
        "LSTMClassifier": torch.randint(0, 30, (2, 12)),
        "Tied": torch.randint(0, 30, (2, 12)),
        "DictOut": torch.randn(2, 10),
        "Conv1dNet": torch.randn(2, 4, 32),
        "SmallTransformer": {
            "input_ids": torch.randint(0, 30, (2, 12)),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
        },
    }[name]
    compressed, plan = _compressed(model)
    tightfit.save(compressed, tmp_path / "m.tfz", plan=plan)
    with pytest.raises(ArtifactError, match="model="):
        tightfit.load(tmp_path / "m.tfz")
    fresh = classes[name]()
    loaded = tightfit.load(tmp_path / "m.tfz", model=fresh)
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
    with torch.no_grad():
        got, expected = call(loaded), call(compressed)
    got, expected = (got["logits"], expected["logits"]) if isinstance(got, dict) else (got, expected)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_unseen_hf_models_round_trip_with_model(name, tmp_path):
    pytest.importorskip("transformers")
    hf = _load_module("hf_models_bench", ROOT / "benchmarks" / "hf_models.py")
    torch.manual_seed(0)
    model, inputs = next((m, x) for n, m, x in hf.models() if n == name)
    model.eval()
    compressed, plan = _compressed(model, kinds=("Linear", "Embedding", "Conv1D", "Conv2d"))
    tightfit.save(compressed, tmp_path / "m.tfz", plan=plan)
    with pytest.raises(ArtifactError, match="model="):
        tightfit.load(tmp_path / "m.tfz")
    torch.manual_seed(123)  # other initial values: the file supplies them all
    fresh = next(m for n, m, _ in hf.models() if n == name)
    loaded = tightfit.load(tmp_path / "m.tfz", model=fresh)
    with torch.no_grad():
        assert torch.equal(hf.logits(loaded, inputs), hf.logits(compressed, inputs))


def test_a_file_written_by_format_1_tightfit(tmp_path):
    """tests/data/format1_sequential.tfz: written by tightfit's format 1 (its architecture a pickle,
    its gap layouts without trailing fillers): Sequential(Linear(8, 64), ReLU(), Linear(64, 3)),
    layers 0 and 2 pruned (0.99, 0.95) and quantized to 4 bits; these are its outputs on ones(1, 8)."""
    path = ROOT / "tests" / "data" / "format1_sequential.tfz"
    expected = torch.tensor([[-0.07452454417943954, 0.0075545646250247955, 0.04099753499031067]])
    assert read_manifest(path)["version"] == 1
    with pytest.raises(ArtifactError, match="never unpickles"):
        tightfit.load(path)
    fresh = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        assert torch.equal(tightfit.load(path, model=fresh)(torch.ones(1, 8)), expected)


def test_transformer_layers_load_without_the_model_after_heads_and_low_rank(tmp_path):
    """nn.TransformerEncoder and its layers are rebuilt from data with the parts compression
    changed: attention with fewer heads (tightfit's SplitQKVAttention), a low-rank feed-forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = nn.Sequential(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0),
            2,
            norm=nn.LayerNorm(16),
            enable_nested_tensor=False,
        ),
        nn.Linear(16, 3),
    ).eval()
    heads = tightfit.StructuredPrune()
    heads.prepare(model, x)
    plan = Plan.from_strategy(
        Compose([heads, tightfit.LowRank()]),
        {
            "0.layers.1.self_attn.out_proj": {"structured_prune": {"head_ratio": 0.5}},
            "0.layers.0.linear1": {"low_rank": {"rank_ratio": 0.25}},
        },
    )
    compressed = apply(plan, model).eval()
    kinds = {type(m).__name__ for m in compressed.modules()}
    assert {"SplitQKVAttention", "Factorized", "MultiheadAttention"} <= kinds
    tightfit.save(compressed, tmp_path / "t.tfz", plan=plan)
    assert read_manifest(tmp_path / "t.tfz")["architecture"] == "architecture.json"
    with torch.no_grad():
        for loaded in (tightfit.load(tmp_path / "t.tfz"), tightfit.load(tmp_path / "t.tfz", model=model)):
            assert [type(m) for m in loaded.modules()] == [type(m) for m in compressed.modules()]
            assert torch.equal(loaded(x), compressed(x))
    # an activation that is a module of the user's choosing is code: not stored as data
    custom = nn.TransformerEncoderLayer(16, 4, 32, activation=nn.Hardswish())
    tightfit.save(custom, tmp_path / "c.tfz")
    assert read_manifest(tmp_path / "c.tfz")["architecture"] is None
