"""int8 ONNX exports give the same answer on CPUs without AVX-512 VNNI.

ONNX Runtime's uint8 x int8 kernel on an AVX2-only CPU adds pairs of products in int16, which
saturates for int8 weights beyond 64 in magnitude (255 * 64 * 2 = 32640 <= 32767). The tests below
hold on any CPU: every int8 weight an export writes is within [-64, 64], and the Int8 operator's
grid is the one the export quantizes to. The slow test runs the exports under
``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512) when qemu is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tightfit
from tightfit.export import export_model
from tightfit.operators import Compose, Int8, Int8Weights, Plan

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


def _int8_initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def test_int8_weights_grid_is_onnx_runtimes_reduced_range():
    w = torch.randn(16, 32)
    q = Int8Weights()
    codes, scale = q.quantize(w)
    assert float(codes.abs().max()) == 64 and torch.equal(q(w), codes * scale)
    assert torch.allclose(scale.squeeze(1), w.abs().amax(dim=1) / 64)


def test_every_int8_export_writes_weights_that_cannot_saturate(tmp_path):
    # before: full-range codes (up to 127), which an AVX2-only CPU's int16 pair sums saturate on
    # (0.117 against a tolerance of 0.024 for this model, benchmarks/int8_saturation.py)
    model, x = _mlp(), torch.randn(8, 64)
    files = [export_model(model, x, tmp_path / "all.onnx", int8="dynamic", rtol=0.05).path]
    lstm = nn.LSTM(16, 32, batch_first=True).eval()
    files.append(export_model(lstm, torch.randn(4, 10, 16), tmp_path / "lstm.onnx", int8="dynamic", rtol=0.05).path)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4)).eval()
    image = torch.randn(2, 3, 8, 8)
    files.append(
        export_model(
            conv, image, tmp_path / "conv.onnx", int8="static", rtol=0.1, calibration=[torch.randn(4, 3, 8, 8), image]
        ).path
    )
    for path in files:
        weights = _int8_initializers(Path(path))
        assert weights, path
        for name, codes in weights.items():
            assert np.abs(codes.astype(np.int32)).max() <= 64, (path, name)


def test_an_int8_plans_weights_are_exported_exactly(tmp_path):
    # The search's grid is the export's, so the file holds the weights the search measured.
    model, x = _mlp(), torch.randn(8, 64)
    plan = Plan.from_strategy(Compose([Int8()]), {"0": {"int8": {"int8": True}}, "2": {"int8": {"int8": True}}})
    marked = tightfit.apply(plan, model).eval()
    report = export_model(marked, x, tmp_path / "q.onnx", int8="dynamic", int8_layers=["0", "2"], rtol=0.05)
    graph = onnx.load(report.path).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    with torch.no_grad():
        expected = [marked[0].weight.t().numpy(), marked[2].weight.t().numpy()]
    rebuilt = []
    for name, codes in values.items():
        if name.endswith("_quantized"):  # ORT's names: <weight>_quantized, <weight>_scale (per column of W^T)
            scale = values[name.removesuffix("_quantized") + "_scale"]
            assert codes.dtype == np.int8 and not values[name.removesuffix("_quantized") + "_zero_point"].any()
            rebuilt.append(codes.astype(np.float32) * scale.astype(np.float32))
    assert len(rebuilt) == 2
    for got, want in zip(sorted(rebuilt, key=np.size, reverse=True), expected):
        assert np.array_equal(got, want)  # not merely close: the same grid


# oneDNN's LSTM (torch's reference for the LSTM) is off by up to 0.47 under qemu 7.2's emulation of
# Haswell; with oneDNN off it matches this CPU's to 9e-8, and ONNX Runtime's int8 LSTM gives the same
# outputs under qemu as here. An emulation artefact, so the reference runs without oneDNN.
_ON_HASWELL = """
import torch, tightfit
from torch import nn
from tightfit.export import export_model
torch.backends.mkldnn.enabled = False
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
r = export_model(model, torch.randn(8, 64), "{tmp}/mlp.onnx", int8="dynamic", rtol=0.05)
print("mlp", r.max_abs_diff, r.atol + r.rtol * r.reference_max_abs)
torch.manual_seed(0)
lstm = nn.LSTM(16, 32, batch_first=True).eval()
r = export_model(lstm, torch.randn(4, 10, 16), "{tmp}/lstm.onnx", int8="dynamic", rtol=0.05)
print("lstm", r.max_abs_diff, r.atol + r.rtol * r.reference_max_abs)
"""


@pytest.mark.slow
def test_int8_exports_pass_their_check_on_an_avx2_only_cpu(tmp_path):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user): no AVX2-only CPU to run on")
    script = tmp_path / "haswell.py"
    script.write_text(textwrap.dedent(_ON_HASWELL.format(tmp=tmp_path)))
    src = str(Path(tightfit.__file__).parents[1])
    done = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"mlp", "lstm"}, done.stdout
