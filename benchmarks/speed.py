"""Real speed (issue 4): measured latency of structured pruning, int8, low-rank and exports.

Every latency is measured with ``tightfit.Latency`` (torch.utils.benchmark: warm-up, blocks of
runs, median and interquartile range) with 2 intra-op threads unless stated. Run it under the
shared timing lock so no other timing job disturbs it:

    flock /tmp/tightfit-timing.lock python benchmarks/speed.py structured --out docs/results/speed_structured.json
    flock /tmp/tightfit-timing.lock python benchmarks/speed.py int8       --out docs/results/speed_int8.json
    flock /tmp/tightfit-timing.lock python benchmarks/speed.py lowrank    --out docs/results/speed_lowrank.json
    flock /tmp/tightfit-timing.lock python benchmarks/speed.py search     --out docs/results/speed_search.json
    flock /tmp/tightfit-timing.lock python benchmarks/speed.py int8search --budget 8 --min-run-time 0.3 --out docs/results/speed_int8search.json

Models: ``ResNetBench`` (a ResNet-style CNN with BatchNorm and projection shortcuts, 3x32x32
inputs, defined here) and ``MLPBench`` (1024-2048-2048-1024-10). Weights are random (seeded):
dense kernels take the same time whatever the values, and outputs are checked against the
PyTorch model, not against labels. ``search`` trains tightfit.demo.LeNet5 on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import tightfit
from tightfit.export import export_model
from tightfit.measure import Latency, analyze, layer_flops
from tightfit.operators import Compose, LowRank, StructuredPrune, apply
from tightfit.search.space import build_space

THREADS = 2


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetBench(nn.Module):
    """ResNet-style: stem, three stages (one block each, widths 48/96/192), global pool, classifier."""

    def __init__(self, widths=(48, 96, 192), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = Block(widths[0], widths[0])
        self.layer2 = Block(widths[0], widths[1], 2)
        self.layer3 = Block(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mlp_bench() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(1024, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def _seeded(build) -> nn.Module:
    """``build()`` with seed 0, so every run times the same weights."""
    torch.manual_seed(0)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # realistic running statistics, so BN coupling matters
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _lat(latency: Latency, model: nn.Module) -> dict:
    r = latency(model)
    return {"median_ms": round(r.median_ms, 4), "iqr_ms": round(r.iqr_ms, 4), "runs": r.runs}


def _flops(model: nn.Module, x) -> int:
    return layer_flops(model, x)[""]


def structured(args) -> dict:
    base = _seeded(ResNetBench)
    x1 = torch.randn(1, 3, 32, 32)
    op = StructuredPrune(round_to=8)
    op.prepare(base, x1)
    space = build_space(Compose([op]), analyze(base))
    meters = {b: Latency(x1, batch_size=b, threads=THREADS, min_run_time=args.min_run_time) for b in (1, 32)}
    base_flops = _flops(base, x1)
    base_lat = {b: _lat(m, base) for b, m in meters.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            model = apply(space.plan({k: ratio for k in space.keys}), base) if ratio > 0 else copy.deepcopy(base)
            row = {"ratio": ratio, "flops": _flops(model, x1), "params": sum(p.numel() for p in model.parameters())}
            row["flops_fraction"] = round(row["flops"] / base_flops, 4)
            row["flops_reduction"] = round(base_flops / row["flops"], 3)
            for b, meter in meters.items():
                lat = base_lat[b] if ratio == 0 else _lat(meter, model)
                row[f"batch{b}"] = {**lat, "speedup": round(base_lat[b]["median_ms"] / lat["median_ms"], 3)}
                report = export_model(model, x1, Path(tmp) / f"r{ratio}_b{b}.onnx", latency=meter)
                row[f"batch{b}"]["onnx_ms"] = round(report.latency_ms, 4)
                row[f"batch{b}"]["onnx_speedup_vs_original_pytorch"] = round(
                    base_lat[b]["median_ms"] / report.latency_ms, 3
                )
                row[f"batch{b}"]["onnx_max_abs_diff"] = report.max_abs_diff
            row["speed_per_flops_reduction_batch32"] = round(row["batch32"]["speedup"] / row["flops_reduction"], 3)
            rows.append(row)
            print(json.dumps(row))
    # The machine drifts (shared host): time the original again, last, with fresh meters, and give
    # each speedup against both measurements of the baseline.
    end_lat = {
        b: _lat(Latency(x1, batch_size=b, threads=THREADS, min_run_time=args.min_run_time), base) for b in (1, 32)
    }
    for row in rows:
        for b in (1, 32):
            row[f"batch{b}"]["speedup_vs_baseline_at_end"] = round(
                end_lat[b]["median_ms"] / row[f"batch{b}"]["median_ms"], 3
            )
    return {
        "model": "ResNetBench (48/96/192), 3x32x32",
        "round_to": 8,
        "threads": THREADS,
        "base_flops": base_flops,
        "baseline": base_lat,
        "baseline_at_end": end_lat,
        "rows": rows,
    }


def int8(args) -> dict:
    out: dict = {"threads": THREADS}
    with tempfile.TemporaryDirectory() as tmp:
        # MLP-heavy model: dynamic int8 (weights int8, activations quantized per call)
        mlp = _seeded(mlp_bench)
        x = torch.randn(32, 1024)
        f32_bytes = _state_dict_bytes(mlp)
        mlp_rows = {"float32_state_dict_bytes": f32_bytes}
        for b in (1, 32):
            meter = Latency(x, batch_size=b, threads=THREADS, min_run_time=args.min_run_time)
            ref = _lat(meter, mlp)
            f_onnx = export_model(mlp, x, Path(tmp) / f"mlp_b{b}.onnx", latency=meter)
            q = export_model(mlp, x, Path(tmp) / f"mlp_b{b}.int8.onnx", int8="dynamic", rtol=0.05, latency=meter)
            bf16_file = export_model(
                mlp,
                x,
                Path(tmp) / f"mlp_b{b}.bf16.ts",
                format="torchscript",
                dtype="bfloat16",
                rtol=0.02,
                latency=meter,
            )
            bf16 = copy.deepcopy(mlp).to(torch.bfloat16)
            bf16_meter = Latency(x.to(torch.bfloat16), batch_size=b, threads=THREADS, min_run_time=args.min_run_time)
            with torch.inference_mode():
                bf16_err = float(
                    (bf16(meter.example_input.to(torch.bfloat16)).float() - mlp(meter.example_input)).abs().max()
                )
            mlp_rows[f"batch{b}"] = {
                "pytorch_float32_ms": ref["median_ms"],
                "pytorch_float32_iqr_ms": ref["iqr_ms"],
                "onnx_float32_ms": round(f_onnx.latency_ms, 4),
                "onnx_int8_ms": round(q.latency_ms, 4),
                "onnx_int8_iqr_ms": round(q.latency_iqr_ms, 4),
                "int8_speedup_vs_pytorch_float32": round(ref["median_ms"] / q.latency_ms, 3),
                "int8_speedup_vs_onnx_float32": round(f_onnx.latency_ms / q.latency_ms, 3),
                "int8_max_abs_diff": q.max_abs_diff,
                "int8_reference_max_abs": q.reference_max_abs,
                "pytorch_bf16_ms": _lat(bf16_meter, bf16)["median_ms"],
                "bf16_max_abs_diff": bf16_err,
                "export_pt_bf16_ms": round(bf16_file.latency_ms, 4),
                "export_pt_bf16_bytes": bf16_file.size_bytes,
                "export_pt_bf16_max_abs_diff": bf16_file.max_abs_diff,
            }
            mlp_rows["onnx_float32_bytes"] = f_onnx.size_bytes
            mlp_rows["onnx_int8_bytes"] = q.size_bytes
            print(json.dumps(mlp_rows[f"batch{b}"]))
        mlp_rows["size_ratio_vs_state_dict"] = round(f32_bytes / mlp_rows["onnx_int8_bytes"], 3)
        out["mlp"] = mlp_rows

        # ResNet-style CNN: static int8 (QDQ, per-channel weights), calibrated on 8 random batches
        cnn = _seeded(ResNetBench)
        xc = torch.randn(1, 3, 32, 32)
        calibration = [torch.randn(8, 3, 32, 32) for _ in range(8)]
        cnn_rows = {"float32_state_dict_bytes": _state_dict_bytes(cnn)}
        for b in (1, 32):
            meter = Latency(xc, batch_size=b, threads=THREADS, min_run_time=args.min_run_time)
            ref = _lat(meter, cnn)
            f_onnx = export_model(cnn, xc, Path(tmp) / f"cnn_b{b}.onnx", latency=meter)
            q = export_model(
                cnn,
                xc,
                Path(tmp) / f"cnn_b{b}.int8.onnx",
                int8="static",
                calibration=calibration,
                rtol=0.1,
                latency=meter,
            )
            cnn_rows[f"batch{b}"] = {
                "pytorch_float32_ms": ref["median_ms"],
                "onnx_float32_ms": round(f_onnx.latency_ms, 4),
                "onnx_int8_ms": round(q.latency_ms, 4),
                "int8_speedup_vs_pytorch_float32": round(ref["median_ms"] / q.latency_ms, 3),
                "int8_speedup_vs_onnx_float32": round(f_onnx.latency_ms / q.latency_ms, 3),
                "int8_max_abs_diff": q.max_abs_diff,
                "int8_reference_max_abs": q.reference_max_abs,
            }
            cnn_rows["onnx_int8_bytes"] = q.size_bytes
            print(json.dumps(cnn_rows[f"batch{b}"]))
        cnn_rows["size_ratio_vs_state_dict"] = round(
            cnn_rows["float32_state_dict_bytes"] / cnn_rows["onnx_int8_bytes"], 3
        )
        out["cnn"] = cnn_rows
    return out


def lowrank(args) -> dict:
    mlp = _seeded(mlp_bench)
    x = torch.randn(1, 1024)
    op = LowRank()
    op.prepare(mlp, x)
    space = build_space(Compose([op]), analyze(mlp))
    meters = {b: Latency(x, batch_size=b, threads=THREADS, min_run_time=args.min_run_time) for b in (1, 32)}
    base_flops = _flops(mlp, x)
    base_lat = {b: _lat(m, mlp) for b, m in meters.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.rank_ratios:
            model = apply(space.plan({k: ratio for k in space.keys}), mlp)
            row = {
                "rank_ratio": ratio,
                "flops_reduction": round(base_flops / _flops(model, x), 3),
                "state_dict_bytes": _state_dict_bytes(model),
            }
            xb = meters[32].example_input
            with torch.inference_mode():
                row["max_abs_diff_vs_original"] = float((model(xb) - mlp(xb)).abs().max())
            for b, meter in meters.items():
                lat = _lat(meter, model)
                report = export_model(model, x, Path(tmp) / f"lr{ratio}_{b}.onnx", latency=meter)
                row[f"batch{b}"] = {
                    **lat,
                    "speedup": round(base_lat[b]["median_ms"] / lat["median_ms"], 3),
                    "onnx_ms": round(report.latency_ms, 4),
                }
            rows.append(row)
            print(json.dumps(row))
    return {
        "model": "MLPBench 1024-2048-2048-1024-10",
        "threads": THREADS,
        "baseline": base_lat,
        "base_state_dict_bytes": _state_dict_bytes(mlp),
        "rows": rows,
    }


def search(args) -> dict:
    """objective="latency" with MaxDrop on the digits CNN; then export and re-measure the speedup."""
    from tightfit.demo import LeNet5, digits_split, train
    from tightfit.export import export_run

    split = digits_split(0)
    torch.manual_seed(0)
    model = train(LeNet5(), split, epochs=40, seed=0)
    x = split.x_val[:1].view(1, 1, 8, 8)
    batch, threads = args.search_batch, args.search_threads
    latency = Latency(x, batch_size=batch, threads=threads, min_run_time=args.min_run_time)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        result = tightfit.compress(
            model,
            evaluate=tightfit.Accuracy(split.loader("val", 512)),
            strategy=StructuredPrune(ratio=(0.0, 0.9)),
            constraint=tightfit.MaxDrop(0.02),
            objective="latency",
            finetune=tightfit.FineTune(split.loader("train", shuffle=True), epochs=3, lr=1e-3),
            example_input=x,
            latency=latency,
            budget=args.budget,
            seed=0,
            run_dir=run_dir,
        )
        wall = time.perf_counter() - started
        best = result.best_trial.measurement if result.feasible else None
        reported = result.baseline.latency_ms / best.latency_ms if best else None
        # Re-measure after export, with fresh meters (no cache): the original model in PyTorch,
        # and the shipped files: model.tfz loaded back, and the ONNX export.
        fresh = Latency(x, batch_size=batch, threads=threads, min_run_time=args.min_run_time)
        original_ms = fresh(model).median_ms
        shipped = tightfit.load(run_dir / "model.tfz", model=model)  # a user class: loaded into an instance
        shipped_ms = Latency(x, batch_size=batch, threads=threads, min_run_time=args.min_run_time)(shipped).median_ms
        onnx = export_run(run_dir, format="onnx", batch_size=batch, threads=threads)
        ts = export_run(run_dir, format="torchscript", batch_size=batch, threads=threads)
        remeasured = original_ms / shipped_ms
        return {
            "model": "tightfit.demo.LeNet5 on digits (trained 40 epochs, seed 0)",
            "latency": {"batch_size": batch, "threads": threads},
            "budget": args.budget,
            "wall_s": round(wall, 1),
            "feasible": result.feasible,
            "message": result.message,
            "baseline_metric": result.baseline_metric,
            "metric": result.metric,
            "plan": result.plan.to_dict() if result.plan else None,
            "architecture": repr(shipped),
            "reported_speedup": reported,
            "reported_ms": {"baseline": result.baseline.latency_ms, "best": best.latency_ms if best else None},
            "remeasured_ms": {
                "original_pytorch": original_ms,
                "model_tfz_pytorch": shipped_ms,
                "export_torchscript": ts.latency_ms,
                "export_onnx": onnx.latency_ms,
            },
            "remeasured_speedup_pytorch": remeasured,
            "remeasured_speedup_export_torchscript": original_ms / ts.latency_ms,
            "relative_difference": abs(remeasured - reported) / reported if reported else None,
            "onnx_speedup_vs_original_pytorch": original_ms / onnx.latency_ms,
            "flops_reduction": result.baseline.flops / best.flops if best else None,
        }


def int8search(args) -> dict:
    """Int8 per layer inside the search (timed in onnxruntime) on LeNet-300-100 / digits; export
    the chosen model and check its accuracy as onnxruntime runs it."""
    import numpy as np

    from tightfit.demo import digits_split, lenet_300_100, train
    from tightfit.export import export_run
    from tightfit.export.onnx import ort_session as _ort_session

    split = digits_split(0)
    torch.manual_seed(0)
    model = train(lenet_300_100(), split, epochs=30, seed=0)
    x = split.x_val[:1]
    latency = Latency(x, batch_size=32, threads=THREADS, min_run_time=args.min_run_time, runtime="onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        result = tightfit.compress(
            model,
            evaluate=tightfit.Accuracy(split.loader("val", 512)),
            strategy=tightfit.Int8(),
            constraint=tightfit.MaxDrop(0.01),
            objective="latency",
            example_input=x,
            latency=latency,
            budget=args.budget,
            seed=0,
            run_dir=run_dir,
        )
        report = export_run(run_dir, format="onnx", batch_size=32, threads=THREADS)
        session = _ort_session(Path(report.path), THREADS)
        logits = session.run(None, {session.get_inputs()[0].name: split.x_test.numpy()})[0]
        onnx_test = float((np.argmax(logits, 1) == split.y_test.numpy()).mean())
        with torch.inference_mode():
            torch_test = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
        best = result.best_trial.measurement
        return {
            "model": "LeNet-300-100 on digits (trained 30 epochs, seed 0)",
            "latency": latency.describe(),
            "budget": args.budget,
            "message": result.message,
            "plan_int8_layers": report.int8_layers,
            "reported_speedup": result.baseline.latency_ms / best.latency_ms,
            "export": report.to_dict(),
            "remeasured_speedup": result.baseline.latency_ms / report.latency_ms,
            "test_accuracy": {"pytorch_float32": torch_test, "onnx_int8": onnx_test},
            "float32_state_dict_bytes": _state_dict_bytes(model),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["structured", "int8", "lowrank", "search", "int8search"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--rank-ratios", type=float, nargs="+", default=[0.125, 0.25, 0.4])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--search-batch", type=int, default=256)
    parser.add_argument("--search-threads", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    parts = {"structured": structured, "int8": int8, "lowrank": lowrank, "search": search, "int8search": int8search}
    data = parts[args.part](args)
    data["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": THREADS,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(data, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
