"""int8 ONNX exports on a CPU without AVX-512 VNNI: the old settings (full-range int8 weights) against
the ones tightfit uses (``PORTABLE_INT8``: reduce_range) and uint8 weights (U8U8).

    apt-get install -y qemu-user      # to emulate an AVX2-only CPU (Haswell: AVX2, no AVX-512)
    PYTHONPATH=src python benchmarks/int8_saturation.py
    PYTHONPATH=src python benchmarks/int8_saturation.py --speed   # the settings' latency on this CPU

Writes the float and quantized ONNX files of the test suite's int8 models into a temporary folder,
runs each with ONNX Runtime on this CPU and, when ``qemu-x86_64`` is installed, under
``qemu-x86_64 -cpu Haswell`` (same Python, same wheels; ONNX Runtime picks its kernels by CPUID, which
qemu emulates), and prints max |int8 - float| with the tolerance the tests use (rtol 0.05, 0.1
static). The runner imports numpy and onnxruntime only, so emulation takes seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(folder: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    for path in sorted(folder.glob("*.q.onnx")):
        name, setting = path.name.split(".")[:2]
        x, ref = np.load(folder / f"{name}.x.npy"), np.load(folder / f"{name}.ref.npy")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = session.run(None, {session.get_inputs()[0].name: x})[0]
        bound = 1e-4 + (0.1 if name == "conv" else 0.05) * float(np.abs(ref).max())
        worst = float(np.abs(y - ref).max())
        print(
            f"  {name:5s} {setting:10s} max|diff| {worst:.4f}  tolerance {bound:.4f}  {'ok' if worst <= bound else 'FAIL'}"
        )


def _write(folder: Path) -> None:
    import numpy as np
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from torch import nn

    from tightfit.export.verified import PORTABLE_INT8

    settings = {"full": {}, "portable": PORTABLE_INT8, "u8u8": {"weight_type": QuantType.QUInt8}}

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter([{"x": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.batches, None)

    def dump(name, model, x, calibration=None):
        float_path = folder / f"{name}.float.onnx"
        torch.onnx.export(model, (x,), str(float_path), input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
        np.save(folder / f"{name}.x.npy", x.numpy())
        with torch.no_grad():
            np.save(folder / f"{name}.ref.npy", model(x)[0].numpy() if name == "lstm" else model(x).numpy())
        for setting, options in settings.items():
            out = str(folder / f"{name}.{setting}.q.onnx")
            options = {"weight_type": QuantType.QInt8, **options}
            if calibration is None:
                quantize_dynamic(str(float_path), out, per_channel=True, **options)
            else:
                quantize_static(
                    str(float_path),
                    out,
                    Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    **options,
                )

    torch.manual_seed(0)  # tests/test_speed_latency_export.py::test_int8_export_is_smaller_and_checked
    dump("mlp", nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval(), torch.randn(8, 64))
    torch.manual_seed(0)
    dump(
        "mlp5",
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)).eval(),
        torch.randn(16, 64),
    )
    torch.manual_seed(0)
    dump("lstm", nn.LSTM(16, 32, batch_first=True).eval(), torch.randn(4, 10, 16))
    torch.manual_seed(0)  # test_static_int8_for_convolutions_needs_and_uses_calibration
    conv = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    dump("conv", conv, x, calibration=[torch.randn(4, 3, 8, 8) for _ in range(4)] + [x])


def _speed() -> None:
    """Median ms of three 512/1024 Linear layers at batch 64, one thread, per setting."""
    import time

    import torch
    from onnxruntime import InferenceSession, SessionOptions
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512)
    ).eval()
    x = torch.randn(64, 512)
    options = SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        float_path = str(Path(tmp) / "float.onnx")
        torch.onnx.export(model, (x,), float_path, input_names=["x"], dynamo=False)
        for setting, kw in {
            "full": {"weight_type": QuantType.QInt8},
            "portable": {"weight_type": QuantType.QInt8, "reduce_range": True},
            "u8u8": {"weight_type": QuantType.QUInt8},
            "float": None,
        }.items():
            path = float_path if kw is None else str(Path(tmp) / f"{setting}.onnx")
            if kw is not None:
                quantize_dynamic(float_path, path, per_channel=True, **kw)
            session, feed = InferenceSession(path, options, providers=["CPUExecutionProvider"]), {"x": x.numpy()}
            for _ in range(20):
                session.run(None, feed)
            times = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(20):
                    session.run(None, feed)
                times.append((time.perf_counter() - start) / 20 * 1e3)
            print(f"  {setting:9s} median {sorted(times)[3]:.2f} ms")


def main() -> None:
    if sys.argv[1:] == ["--speed"]:
        _speed()
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        _run(Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp))
        print("this CPU:")
        _run(Path(tmp))
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            print("qemu-x86_64 not installed: no AVX2-only run (apt-get install -y qemu-user)")
            return
        print("qemu-x86_64 -cpu Haswell (AVX2, no AVX-512 / VNNI):")
        done = subprocess.run(
            [qemu, "-cpu", "Haswell", sys.executable, __file__, "--run", tmp], capture_output=True, text=True
        )
        print(done.stdout, end="")
        if done.returncode:
            print(done.stderr[-2000:])


if __name__ == "__main__":
    main()
