"""int8 for GPT-2's ``Conv1D`` layers, end to end: ``Int8(choices=(True,))`` puts every layer it
can run as an ``nn.Linear`` in int8, the search times the trial as the int8 ONNX model
(``Latency(runtime="onnxruntime")``), then ``export_run`` writes and checks those layers in int8.
A GPT-2 built from its config (4 layers, width 256; random weights, nothing is downloaded),
label-free metric: cosine similarity of the logits to the original's, ``MaxDrop(0.05)``.

Printed (and written to ``--out``): how many layers the plan put in int8 (``Conv1D`` among them),
how many int8 MatMul nodes the exported file holds, the file sizes and latencies (1 thread) of the
float32 and the int8 ONNX model, and the int8 export's largest output difference. Hold the lock:

    .venv/bin/pip install -c constraints.txt -e '.[hf]'   # transformers: not a dependency of tightfit itself
    flock /tmp/tightfit-timing.lock env PYTHONPATH=src python benchmarks/hf_gpt2_int8.py \
        --out docs/results/hf_gpt2_int8.json

(The TorchScript exporter fails on GPT-2 and torch prints its graph; the dynamo exporter is used.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import tightfit
from tightfit.export import export_model, export_run


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, help="also write the record to this JSON file")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # use_cache=False: the cache object GPT-2 returns otherwise cannot be exported to ONNX
    config = GPT2Config(
        vocab_size=1000,
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids)
    with torch.no_grad():
        reference = model(**inputs).logits

    def metric(m):
        with torch.no_grad():
            out = m(**inputs).logits
        return float(torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).mean())

    latency = tightfit.Latency(inputs, threads=1, runtime="onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        result = tightfit.compress(
            model,
            evaluate=metric,
            strategy=tightfit.Int8(choices=(True,)),
            objective="latency",
            constraint=tightfit.MaxDrop(0.05),
            latency=latency,
            example_input=inputs,
            budget=1,
            seed=0,
            run_dir=run_dir,
        )
        chosen = sorted(n for n, per_op in result.plan.layers.items() if per_op["int8"]["int8"])
        int8 = export_run(run_dir, format="onnx", threads=1)
        float32 = export_model(model, inputs, Path(tmp) / "float.onnx", latency=tightfit.Latency(inputs, threads=1))
        import onnx

        ops = [node.op_type for node in onnx.load(int8.path).graph.node]
    conv1d = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Conv1D")
    record = {
        "conv1d_layers": len(conv1d),
        "int8_layers_chosen": len(chosen),
        "int8_conv1d_chosen": len(set(chosen) & set(conv1d)),
        "matmul_integer_nodes": ops.count("MatMulInteger"),
        "metric": result.metric,
        "float32_onnx_bytes": float32.size_bytes,
        "int8_onnx_bytes": int8.size_bytes,
        "float32_onnx_ms": float32.latency_ms,
        "float32_onnx_iqr_ms": float32.latency_iqr_ms,
        "int8_onnx_ms": int8.latency_ms,
        "int8_onnx_iqr_ms": int8.latency_iqr_ms,
        "pytorch_float32_ms": int8.reference_latency_ms,
        "int8_latency_in_search_ms": result.best_trial.measurement.latency_ms if result.best_trial else None,
        "float32_latency_in_search_ms": result.baseline.latency_ms if result.baseline else None,
        "int8_max_abs_diff": int8.max_abs_diff,
        "reference_max_abs": int8.reference_max_abs,
        "left_alone": [s.name for s in result.left_alone],
    }
    print(json.dumps(record, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
