"""Latency measurement (and its cache), latency in the search, verified export."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tightfit
from tightfit.cli.app import app as cli_app
from tightfit.errors import ConfigError
from tightfit.export import ExportCheckError, export_model
from tightfit.export.verified import compare_outputs
from tightfit.measure import Latency, architecture_key
from tightfit.operators import Compose, Plan, Prune, StructuredPrune, apply


def _mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    ).eval()


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def test_latency_is_cached_per_architecture():
    latency = Latency(X, batch_size=8, threads=1, min_run_time=0.01)
    model = _mlp()
    first = latency(model)
    assert (
        first.median_ms > 0 and first.iqr_ms >= 0 and first.runs >= 1 and first.batch_size == 8 and first.threads == 1
    )
    assert latency.example_input.shape == (8, 16)
    # same architecture, other values (a masked copy): answered from the cache, not timed again
    masked = apply(Plan.from_strategy(Compose([Prune()]), {"0": {"prune": {"sparsity": 0.5}}}), model)
    assert latency(masked) == first and latency.hits == 1 and latency.misses == 1
    # another architecture is timed
    latency(_mlp(width=24))
    assert latency.misses == 2
    assert architecture_key(model) != architecture_key(_mlp(width=24))
    with pytest.raises(ConfigError, match="batch_size"):
        Latency(X, batch_size=0)


@pytest.mark.onnx
def test_export_formats_reload_and_match(tmp_path):
    model = _mlp()
    latency = Latency(X, threads=1, min_run_time=0.01)
    for fmt in ("onnx", "torchscript"):
        report = export_model(model, X, tmp_path / f"m.{fmt}", format=fmt, latency=latency)
        assert report.size_bytes == (tmp_path / f"m.{fmt}").stat().st_size > 0
        assert report.max_abs_diff <= report.atol + report.rtol * report.reference_max_abs
        assert report.latency_ms > 0 and report.reference_latency_ms > 0
    # a whole pickled module runs code when loaded: refused before anything is written
    with pytest.raises(ConfigError, match="pickled module"):
        export_model(model, X, tmp_path / "m.pt", format="pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.onnx
def test_int8_export_is_smaller_and_checked(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(8, 64)
    f32 = export_model(model, x, tmp_path / "f.onnx")
    q = export_model(model, x, tmp_path / "q.onnx", int8="dynamic", rtol=0.05)
    assert q.size_bytes < f32.size_bytes / 3
    kept = export_model(model, x, tmp_path / "k.onnx", int8="dynamic", rtol=0.05, keep_float=["2"])
    assert q.size_bytes < kept.size_bytes < f32.size_bytes  # layer "2" stayed float
    with pytest.raises(ConfigError, match="onnx"):
        export_model(model, x, tmp_path / "q.pt", format="pt", int8="dynamic")
    # every layer kept float: ONNX Runtime quantizes nothing, and the file is refused, not shipped
    # as an "int8" model at float's size
    from tightfit.errors import ArtifactError

    with pytest.raises(ArtifactError, match="left any layer of this model in float"):
        export_model(model, x, tmp_path / "none.onnx", int8="dynamic", keep_float=["*"])


class Noisy(nn.Module):
    """Its traced export cannot reproduce its outputs: fresh noise on every call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x) + torch.randn(x.shape[0], 3)


@pytest.mark.onnx
def test_export_check_fails_when_outputs_differ(tmp_path):
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportCheckError, match="differ"):
            export_model(Noisy().eval(), X, tmp_path / f"n.{fmt}", format=fmt)
        assert not (tmp_path / f"n.{fmt}").exists()  # a file that failed its check is not left behind
    with pytest.raises(ExportCheckError, match="shape"):
        compare_outputs([torch.zeros(2, 3)], [torch.zeros(3, 2)], 1e-4, 1e-3)
    with pytest.raises(ExportCheckError):
        compare_outputs([torch.zeros(2)], [torch.tensor([0.0, float("nan")])], 1e-4, 1e-3)


def test_latency_objective_run_records_speedup_and_exports(tmp_path):
    # the model comes from a factory in a config's folder: `tightfit export --config` builds it
    (tmp_path / "latmods.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))\n"
        "def metric(model):\n    return 1.0\n"
    )
    (tmp_path / "lat.toml").write_text(
        '[model]\nfactory = "latmods:build"\n[evaluate]\nfunction = "latmods:metric"\n'
        '[[strategy]]\noperator = "prune"\n[constraint]\nmax_drop = 1.0\n'
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    xs, ys = torch.randn(64, 16), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=32)
    run_dir = tmp_path / "run"
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(loader),
        strategy=StructuredPrune(ratio=(0.0, 0.5)),
        constraint=[tightfit.MaxDrop(1.0), tightfit.MaxLatency(1e4)],
        objective="latency",
        example_input=xs[:8],
        latency=Latency(xs[:8], threads=1, min_run_time=0.01),
        budget=3,
        run_dir=run_dir,
    )
    assert result.feasible and result.best_trial.measurement.latency_ms > 0
    assert "Measured" in result.message and "ms per forward pass" in result.message
    assert (run_dir / "example_input.pt").exists()
    with open(run_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"latency_ms", "speedup", "flops_reduction"} <= set(rows[0])
    assert all(float(r["speedup"]) > 0 and float(r["flops_reduction"]) >= 1.0 for r in rows)
    # `tightfit report` shows the measured speedup next to the FLOPs reduction
    shown = CliRunner().invoke(cli_app, ["report", str(run_dir)])
    assert shown.exit_code == 0 and "speed" in shown.output and "FLOPs" in shown.output, shown.output
    # the CLI export writes, reloads, checks and times the run's model
    out = CliRunner().invoke(
        cli_app,
        ["export", str(run_dir), "--format", "torchscript", "--threads", "1", "--out", str(tmp_path / "plain.ts")],
    )
    assert out.exit_code == 0, out.output  # torch.nn layers only: the file's data-only architecture is rebuilt
    out = CliRunner().invoke(
        cli_app,
        ["export", str(run_dir), "--config", str(tmp_path / "lat.toml"), "--format", "torchscript", "--threads", "1"],
    )
    assert out.exit_code == 0, out.output
    record = json.loads((run_dir / "export" / "model.ts.json").read_text())
    assert record["size_bytes"] > 0 and record["latency_ms"] > 0 and "speedup_vs_baseline_in_search" in record


def test_latency_needs_an_example_input():
    with pytest.raises(ConfigError, match="example_input"):
        tightfit.compress(_mlp(), evaluate=lambda m: 1.0, objective="latency", budget=1)
    with pytest.raises(ConfigError, match="example_input"):
        tightfit.compress(_mlp(), evaluate=lambda m: 1.0, constraint=tightfit.MaxLatency(5), budget=1)
    with pytest.raises(ConfigError, match="max_ms"):
        tightfit.MaxLatency(0)


def test_config_maps_latency_objective_and_structural_operators(tmp_path):
    from tightfit.cli.config import build_arguments, load_config

    (tmp_path / "speedmods.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))\n"
        "def example_input():\n    return torch.zeros(2, 16)\n"
        "def metric(model):\n    return 1.0\n"
    )
    (tmp_path / "run.toml").write_text(
        'objective = "latency"\nexample_input = "speedmods:example_input"\n'
        '[model]\nfactory = "speedmods:build"\n[evaluate]\nfunction = "speedmods:metric"\n'
        '[[strategy]]\noperator = "structured_prune"\nratio = [0.0, 0.5]\nround_to = 8\n'
        '[[strategy]]\noperator = "low_rank"\nrank_ratio = [0.25, 1.0]\n'
        "[constraint]\nmax_drop = 0.01\nmax_latency_ms = 50\n"
        "[latency]\nbatch_size = 32\nthreads = 1\n"
    )
    config, base = load_config(tmp_path / "run.toml")
    args = build_arguments(config, base, tmp_path / "run.toml")
    assert args["objective"] == "latency"
    assert [op.name for op in args["strategy"]] == ["structured_prune", "low_rank"]
    assert args["latency"].batch_size == 32 and args["latency"].threads == 1
    assert any(isinstance(c, tightfit.MaxLatency) for c in args["constraint"])


@pytest.mark.onnx
def test_int8_chosen_per_layer_in_the_search_is_what_the_export_ships(tmp_path):
    from tightfit.export import export_run
    from tightfit.operators import Int8, int8_layers
    from tightfit.operators.int8 import plan_int8_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    x = torch.randn(16, 64)
    plan = Plan.from_strategy(Compose([Int8()]), {"0": {"int8": {"int8": True}}, "2": {"int8": {"int8": False}}})
    marked = apply(plan, model)
    assert int8_layers(marked) == ["0"] and plan_int8_layers(plan) == ["0"]
    # the runtime meter times the int8 ONNX model, and tells it apart from the float one
    meter = Latency(x, threads=1, min_run_time=0.01, runtime="onnxruntime")
    meter(model)
    meter(marked)
    assert meter.misses == 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 4, (16,))), batch_size=8)
    run_dir = tmp_path / "run"
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(loader),
        strategy=Int8(choices=(True,)),
        constraint=tightfit.MaxDrop(1.0),
        objective="latency",
        example_input=x,
        latency=meter,
        budget=1,
        run_dir=run_dir,
    )
    assert plan_int8_layers(result.plan) == ["0", "2", "4"]
    report = export_run(run_dir, model=model, format="onnx", threads=1)
    assert report.int8 == "dynamic" and report.int8_layers == ["0", "2", "4"] and report.rtol == 0.05
    float_bytes = export_model(model, x, tmp_path / "f.onnx").size_bytes
    assert report.size_bytes < float_bytes / 3
    with pytest.raises(ConfigError, match="runtime"):
        Latency(x, runtime="tensorrt")


@pytest.mark.onnx
def test_int8_layers_are_found_in_a_dynamo_export_and_after_pre_processing(tmp_path):
    # A model the TorchScript exporter cannot export (Hugging Face GPT-2) goes through the dynamo
    # exporter, whose node names carry no module path (the int8 layers were not found: an error);
    # ONNX Runtime's pre-processing then renames fused nodes (missed, the export stayed float).
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from tightfit.export.onnx import carried_over as _carried_over
    from tightfit.export.onnx import onnx_nodes_for

    def save(nodes, name):
        value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])  # noqa: E731
        path = tmp_path / name
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [value("x")], [value("y")])), str(path))
        return path

    gemm = helper.make_node("Gemm", ["x", "w"], ["h"], name="node_Gemm_7")
    gemm.metadata_props.add(
        key="pkg.torch.onnx.name_scopes", value="['', 'h.0', 'h.0.attn', 'h.0.attn.c_attn', 'addmm']"
    )
    relu = helper.make_node("Relu", ["h"], ["y"], name="node_Relu_8")
    exported = save([gemm, relu], "dynamo.onnx")
    assert onnx_nodes_for(exported, ["h.0.attn.c_attn"]) == ["node_Gemm_7", "node_Gemm_7_MatMul"]
    assert onnx_nodes_for(exported, ["h.0.attn"]) == ["node_Gemm_7", "node_Gemm_7_MatMul"]  # a module and all below it
    fused = save(
        [
            helper.make_node("Gemm", ["x", "w"], ["h"], name="node_Gemm_7/MatMulAddFusion"),
            helper.make_node("Gemm", ["h", "w"], ["y"], name="node_Gemm_70"),
        ],
        "prepared.onnx",
    )
    assert _carried_over(fused, ["node_Gemm_7", "node_Gemm_7_MatMul"]) == [
        "node_Gemm_7/MatMulAddFusion",
        "node_Gemm_7/MatMulAddFusion_MatMul",
    ]


@pytest.mark.onnx
def test_bfloat16_export_halves_the_file_and_keeps_a_float32_interface(tmp_path):
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(4, 64)
    f32 = export_model(model, x, tmp_path / "f.ts", format="torchscript")
    half = export_model(model, x, tmp_path / "h.ts", format="torchscript", dtype="bfloat16", rtol=0.02)
    assert half.dtype == "bfloat16" and half.size_bytes < 0.6 * f32.size_bytes
    loaded = torch.jit.load(str(tmp_path / "h.ts"))
    assert loaded(x).dtype == torch.float32
    with pytest.raises(ExportCheckError):  # bfloat16 cannot meet a float32 tolerance
        export_model(model, x, tmp_path / "strict.ts", format="torchscript", dtype="bfloat16", atol=0.0, rtol=1e-7)
    with pytest.raises(ConfigError, match="dtype"):
        export_model(model, x, tmp_path / "h.onnx", format="onnx", dtype="bfloat16")


@pytest.mark.onnx
def test_static_int8_for_convolutions_needs_and_uses_calibration(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="calibration"):
        export_model(model, x, tmp_path / "nocal.onnx", int8="static")
    f32 = export_model(model, x, tmp_path / "f.onnx")
    q = export_model(
        model,
        x,
        tmp_path / "q.onnx",
        int8="static",
        calibration=[torch.randn(4, 3, 8, 8) for _ in range(4)] + [x],
        rtol=0.1,
    )
    assert q.size_bytes < f32.size_bytes / 2.5 and q.int8 == "static"


class TakesOneDict(nn.Module):
    """``forward(batch)`` reads its inputs from one dict (a convolution for static int8 to find)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.table = nn.Linear(6, 8)
        self.head = nn.Linear(8 * 4 * 4 + 8, 3)

    def forward(self, batch):
        return self.head(torch.cat([self.image(batch["image"]), torch.relu(self.table(batch["features"]))], dim=1))


def _one_dict(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"image": torch.randn(n, 1, 4, 4, generator=g), "features": torch.randn(n, 6, generator=g)}


@pytest.mark.onnx
def test_a_model_whose_forward_takes_one_dict_exports_in_every_format(tmp_path):
    torch.manual_seed(0)
    model, x = TakesOneDict().eval(), _one_dict(4)
    latency = Latency(x, batch_size=6, threads=1, min_run_time=0.01)  # checked at another batch size than traced
    for fmt in ("onnx", "torchscript"):
        report = export_model(model, x, tmp_path / f"m.{fmt}", format=fmt, latency=latency)
        assert report.max_abs_diff <= report.atol + report.rtol * report.reference_max_abs and report.latency_ms > 0
    # each file is used the way the model is: ONNX fed by the dict's keys, the others called with the dict
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    other = _one_dict(3)
    assert [i.name for i in session.get_inputs()] == ["image", "features"]
    (onnx_out,) = session.run(None, {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        expected = model(other)
        assert torch.allclose(torch.as_tensor(onnx_out), expected, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.torchscript"))(other), expected, atol=1e-5)
    # int8 (dynamic; static calibrated on dicts), a 16-bit dtype, and ONNX Runtime latency
    assert export_model(model, x, tmp_path / "d.onnx", int8="dynamic", rtol=0.05).int8_layers == []
    assert (
        export_model(model, x, tmp_path / "s.onnx", int8="static", calibration=[_one_dict(8), x], rtol=0.1).int8
        == "static"
    )
    assert (
        export_model(model, x, tmp_path / "h.ts", format="torchscript", dtype="bfloat16", rtol=0.05).dtype == "bfloat16"
    )
    assert Latency(x, threads=1, min_run_time=0.01, runtime="onnxruntime")(model).median_ms > 0


@pytest.mark.onnx
def test_a_one_dict_model_goes_through_the_dynamo_exporter_too(tmp_path, monkeypatch):
    # the fallback for models the TorchScript-based exporter cannot take (dynamic batch over the dict's tensors)
    real_export = torch.onnx.export

    def legacy_fails(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript-based exporter failed")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_fails)
    torch.manual_seed(0)
    model, x = TakesOneDict().eval(), _one_dict(4)
    report = export_model(model, x, tmp_path / "m.onnx", latency=Latency(x, batch_size=6, threads=1, min_run_time=0.01))
    assert report.max_abs_diff <= report.atol + report.rtol * report.reference_max_abs


class _Cache:
    """Stands in for Hugging Face's DynamicCache / EncoderDecoderCache: an object, not a tensor."""

    def __init__(self, keys):
        self.keys = keys


class _DictOutputLM(nn.Module):
    """Keyword inputs, a dict output holding a cache object between its tensors (as a Hugging Face
    causal LM returns with use_cache=True)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask=None, use_cache=True):
        h = torch.relu(self.body(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"logits": self.head(h), "past_key_values": _Cache([h]) if use_cache else None, "hidden": h}


@pytest.mark.onnx
def test_export_of_a_dict_output_with_a_cache_object_and_keyword_inputs(tmp_path):
    # The TorchScript tracer refused the dict ("Encountering a dict at the output") and the ONNX
    # exporter the cache object; both now trace the output's tensors, checked against the model's.
    pytest.importorskip("onnxruntime")
    from tightfit.export.onnx import onnx_nodes_for

    torch.manual_seed(0)
    model = _DictOutputLM().eval()
    inputs = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5), "use_cache": True}
    for fmt in ("torchscript", "onnx"):
        report = export_model(model, inputs, tmp_path / f"lm.{fmt}", format=fmt)
        assert report.max_abs_diff <= 1e-5 and report.size_bytes > 0
    assert onnx_nodes_for(tmp_path / "lm.onnx", ["head"])  # node names are the model's own (keep_float finds them)
    loaded = torch.jit.load(str(tmp_path / "lm.torchscript"))
    logits, hidden = loaded(inputs["input_ids"], inputs["attention_mask"])  # the input's tensors, positionally
    assert torch.allclose(logits, model(**inputs)["logits"], atol=1e-6)
