"""Compressing TRAINED recurrent models (nn.LSTM, nn.GRU): what the default search reaches.

Task: scikit-learn's digits (tightfit.demo.digits_split, no download), each 8x8 image read as a
sequence of 8 rows of 8 pixels. Models: a 2-layer LSTM and a 2-layer GRU (hidden 64,
batch_first), the last step's state into a Linear classifier. Trained once (Adam, seed 0, 30
epochs) and cached in benchmarks/results/.original_<cell>_digits.pt (gitignored).

For each: one tightfit.compress search with the default strategy (Prune + Quantize per layer; a
recurrent layer's weight matrices share one setting), MaxDrop(0.01) on validation accuracy,
budget 20, a 3-epoch tightfit.FineTune per trial, seed 0. Reported: the .tfz bytes of the original
(float32) and of the answer, validation and test accuracy. For the LSTM also: the answer exported
to ONNX with dynamic int8 (ONNX Runtime's DynamicQuantizeLSTM for the recurrent layer), its file
bytes and test accuracy when run by ONNX Runtime.

    PYTHONPATH=src nice -n 10 python benchmarks/recurrent.py --out docs/results/recurrent.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tightfit
from tightfit.demo.data import digits_split, train

RESULTS = Path(__file__).parent / "results"


class DigitsRNN(nn.Module):
    """A flat (N, 64) digit read as 8 steps of 8 pixels, so the demo's loaders and Accuracy fit."""

    def __init__(self, cell: str, hidden: int = 64):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](8, hidden, num_layers=2, batch_first=True)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(-1, 8, 8))
        return self.classifier(out[:, -1])


def trained(cell: str, split) -> nn.Module:
    cache = RESULTS / f".original_{cell}_digits.pt"
    torch.manual_seed(0)
    model = DigitsRNN(cell)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    model = train(model, split, epochs=30, lr=2e-3, seed=0)
    RESULTS.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def onnx_int8(model: nn.Module, split) -> tuple[int, float]:
    """(file bytes, test accuracy under ONNX Runtime) of the model exported with dynamic int8."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        tightfit.export_model(model, split.x_val[:4], path, format="onnx", int8="dynamic", rtol=0.05)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {session.get_inputs()[0].name: split.x_test.numpy()})
        return path.stat().st_size, float((np.argmax(logits, 1) == split.y_test.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = digits_split(0)
    test = tightfit.Accuracy(split.loader("test", batch_size=512))
    lines = [
        "| model | parameters | original .tfz bytes | answer .tfz bytes | size ratio | val acc (orig) | test acc (orig) | search s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    for cell in ("lstm", "gru"):
        model = trained(cell, split)
        started = time.perf_counter()
        result = tightfit.compress(
            model,
            evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
            constraint=tightfit.MaxDrop(0.01),
            finetune=tightfit.FineTune(split.loader("train", shuffle=True), epochs=3, lr=1e-3),
            budget=args.budget,
            seed=0,
            example_input=split.x_val[:1],
        )
        seconds = time.perf_counter() - started
        n_params = sum(p.numel() for p in model.parameters())
        lines.append(
            f"| {cell.upper()} 2x64 | {n_params:,} | {result.baseline_size_bytes:,} | {result.size_bytes:,} | "
            f"{result.compression_ratio:.1f}x | {result.metric:.4f} ({result.baseline_metric:.4f}) | "
            f"{test(result.model):.4f} ({test(model):.4f}) | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
        if cell == "lstm":
            plain_bytes, plain_acc = onnx_int8(model, split)
            bytes_, acc = onnx_int8(result.model, split)
            extra.append(
                f"- LSTM, ONNX with dynamic int8 (DynamicQuantizeLSTM): original {plain_bytes:,} bytes, "
                f"test accuracy {plain_acc:.4f}; the answer {bytes_:,} bytes, test accuracy {acc:.4f}."
            )
            print(extra[-1], flush=True)
    text = "\n".join(lines + [""] + extra) + "\n"
    if args.out:
        args.out.write_text(
            "# Trained recurrent models (`benchmarks/recurrent.py`)\n\n"
            "Command: `PYTHONPATH=src nice -n 10 python benchmarks/recurrent.py --out docs/results/recurrent.md`\n"
            f"(budget {args.budget}, default strategy Prune + Quantize, MaxDrop(0.01), 3-epoch fine-tune per trial, seed 0).\n\n"
            + text
        )


if __name__ == "__main__":
    main()
