"""Issue 17's first two done-when lines on the benchmark tasks (docs/tasks.md), no training:

- 4-bit weights, group 128: GPTQ against round-to-nearest (group 128; per channel for reference),
  and 3-bit (GPTQ and round-to-nearest, group 128);
- 50% unstructured and 2:4 sparsity: Wanda and SparseGPT against magnitude pruning.

Every row is one ``tightfit.compress_once`` call on the task's trained model, scored on the test
split (and the validation split, to show the two agree), with the file's bytes
(``tightfit.export.to_bytes``, what ``tightfit.save`` writes) and the wall time of compression.
Calibration: the first ``--calibration`` samples of the task's calibration loader (512 training
samples drawn with seed 0), labels stripped. No repair by default (``repair=()``): the rows
compare the operators alone; ``--repair batchnorm`` re-estimates BatchNorm statistics on the same
samples after every setting (calibrated or not), which changes the CNN verdicts (docs/calibration.md).
tiny-lm: only the blocks are compressed (``transformer.h.*``); its embedding is tied with the head
(such a layer is rounded to nearest anyway, so it would add the same error to every row).
minilm: only the encoder's 36 Linear layers (``bert.encoder.*``); the embeddings (word, position,
token type, 11.9 M of the 22.6 M parameters) are left as they are, as in tiny-lm. Its metric is the
cosine fidelity of the sentence embeddings to the float32 model's (1 = unchanged).

    nice -n 10 env PYTHONPATH=src /work/venv/bin/python benchmarks/calibrated_tasks.py --task tiny-lm \\
        --out docs/results/calibrated_tiny-lm.json
    PYTHONPATH=src /work/venv/bin/python benchmarks/calibrated_tasks.py --table docs/results/calibrated_tiny-lm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tightfit  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from tightfit import Prune, Quantize  # noqa: E402
from tightfit.export import to_bytes  # noqa: E402

SETTINGS: list[tuple[str, Any]] = [
    ("RTN per channel, 4 bit", lambda layers: Quantize(4, layers=layers)),
    ("RTN g128, 4 bit", lambda layers: Quantize(4, group_size=128, layers=layers)),
    ("GPTQ g128, 4 bit", lambda layers: Quantize(4, method="gptq", group_size=128, layers=layers)),
    (
        "GPTQ g128 act order, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, act_order=True, layers=layers),
    ),
    (
        "GPTQ g128 act order groups, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, act_order="groups", layers=layers),
    ),
    ("RTN g128 asymmetric, 4 bit", lambda layers: Quantize(4, group_size=128, symmetric=False, layers=layers)),
    (
        "GPTQ g128 asymmetric, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, symmetric=False, layers=layers),
    ),
    (
        "GPTQ g128 asymmetric act order, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, symmetric=False, act_order=True, layers=layers),
    ),
    (
        "GPTQ g128 asymmetric act order groups, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, symmetric=False, act_order="groups", layers=layers),
    ),
    ("RTN g128, 3 bit", lambda layers: Quantize(3, group_size=128, layers=layers)),
    ("GPTQ g128, 3 bit", lambda layers: Quantize(3, method="gptq", group_size=128, layers=layers)),
    ("magnitude 50%", lambda layers: Prune(0.5, layers=layers)),
    ("Wanda 50%", lambda layers: Prune(0.5, method="wanda", layers=layers)),
    ("SparseGPT 50%", lambda layers: Prune(0.5, method="sparsegpt", layers=layers)),
    ("magnitude 2:4", lambda layers: Prune(pattern="2:4", layers=layers)),
    ("Wanda 2:4", lambda layers: Prune(pattern="2:4", method="wanda", layers=layers)),
    ("SparseGPT 2:4", lambda layers: Prune(pattern="2:4", method="sparsegpt", layers=layers)),
    # target="original": each layer first fit to the original model's outputs (docs/calibration.md)
    ("Wanda 50% to original", lambda layers: Prune(0.5, method="wanda", target="original", layers=layers)),
    ("SparseGPT 50% to original", lambda layers: Prune(0.5, method="sparsegpt", target="original", layers=layers)),
    ("Wanda 2:4 to original", lambda layers: Prune(pattern="2:4", method="wanda", target="original", layers=layers)),
    (
        "SparseGPT 2:4 to original",
        lambda layers: Prune(pattern="2:4", method="sparsegpt", target="original", layers=layers),
    ),
    (
        "GPTQ g128 to original, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, target="original", layers=layers),
    ),
    (
        "GPTQ g128 asymmetric to original, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, symmetric=False, target="original", layers=layers),
    ),
    (
        "GPTQ g128 to original, 3 bit",
        lambda layers: Quantize(3, method="gptq", group_size=128, target="original", layers=layers),
    ),
]
LAYERS = {"tiny-lm": ["transformer.h.*"], "minilm": ["bert.encoder.*"]}  # other tasks: every layer an operator takes


def model_inputs(loader: Any, samples: int, skip: int = 0) -> list[Any]:
    """``samples`` inputs of a labelled loader after its first ``skip``, as model inputs: an image
    batch is ``[x, y]``, a language-model batch ``{"input_ids", "labels"}`` (labels would make the
    forward compute a loss the hooks do not need; other keys, e.g. an attention mask, stay)."""
    out, seen, passed = [], 0, 0
    for batch in loader:
        x = {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) else batch[0]
        n = len(x["input_ids"] if isinstance(x, dict) else x)
        start = min(n, max(0, skip - passed))
        passed += start
        take = min(n - start, samples - seen)
        if take > 0:
            end = start + take
            out.append({k: v[start:end] for k, v in x.items()} if isinstance(x, dict) else x[start:end])
        seen += max(0, take)
        if seen >= samples:
            return out
    raise SystemExit(f"--calibration {samples} --skip {skip}: the task's calibration loader has too few samples")


def narrow_layers(model: torch.nn.Module, layers: list[str] | None) -> dict[str, int]:
    """Layers whose input columns (per group) number fewer than 128: group 128 is one group per row there."""
    import fnmatch

    out = {}
    for name, m in model.named_modules():
        if layers and not any(fnmatch.fnmatch(name, p) for p in layers):
            continue
        if isinstance(m, torch.nn.Linear):
            cols = m.in_features
        elif isinstance(m, torch.nn.Conv2d):
            cols = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif type(m).__name__ == "Conv1D":  # GPT-2's input-major matrix layer
            cols = m.weight.shape[0]
        else:
            continue
        if cols < 128:
            out[name] = cols
    return out


def score(task: Any, model: torch.nn.Module, val: bool = True) -> dict[str, float | None]:
    t0 = time.perf_counter()
    test = float(task.test_metric(model))
    t1 = time.perf_counter()
    return {"test": test, "val": float(task.metric(model)) if val else None, "test_eval_s": round(t1 - t0, 1)}


def run(
    task_name: str, samples: int, only: list[str] | None, repair: tuple[str, ...], val: bool, skip: int = 0
) -> dict[str, Any]:
    torch.manual_seed(0)
    task = load_task(task_name)
    model = task.model().eval()
    layers = LAYERS.get(task_name)
    calibration = model_inputs(task.calibration, samples, skip)
    rows = [{"setting": "float32", **score(task, model, val), "bytes": len(to_bytes(model))}]
    print(f"{task_name}: float32 {rows[0]}", flush=True)
    for label, make in SETTINGS:
        if only and label not in only:
            continue
        strategy = make(layers)
        t0 = time.perf_counter()
        calibrated = strategy.needs_calibration() or bool(repair)
        result = tightfit.compress_once(model, strategy, calibration=calibration if calibrated else None, repair=repair)
        seconds = time.perf_counter() - t0
        row = {
            "setting": label,
            **score(task, result.model, val),
            "bytes": len(to_bytes(result.model, result.plan)),
            "compress_s": round(seconds, 1),
            "calibration_passes": result.calibration_passes,
            "uncalibrated": result.uncalibrated,
            "left_alone": result.left_alone,
            "repaired": {k: len(v) for k, v in result.repaired.items()},
        }
        rows.append(row)
        print(
            f"  {label:24s} test {row['test']:.4f} val {row['val']} {row['bytes']:>9d} B "
            f"{seconds:6.1f} s passes {row['calibration_passes']} uncalibrated {len(row['uncalibrated'])} "
            f"left alone {len(row['left_alone'])}",
            flush=True,
        )
    return {
        "task": task_name,
        "metric": task.metric_name,
        "calibration_samples": samples,
        **({"calibration_skipped": skip} if skip else {}),
        "repair": list(repair),
        "layers": layers,
        "narrow_layers": narrow_layers(model, layers),
        "load_average": os.getloadavg(),
        "rows": rows,
    }


def markdown(record: dict[str, Any]) -> str:
    """One table: test and validation metric, the loss against float32 (positive: worse), bytes."""
    lm = record["task"] == "tiny-lm"
    fidelity = record["task"] == "minilm"
    rows, base = record["rows"], record["rows"][0]
    head = "| setting | test loss (ppl) | test loss vs float32 (nats) | val loss vs float32 |"
    if fidelity:
        head = "| setting | test fidelity (cosine) | test loss vs float32 (1 - cosine) | val loss vs float32 |"
    elif not lm:
        head = "| setting | test accuracy | test loss vs float32 (points) | val loss vs float32 |"
    out = [head + " file bytes | compress s (passes) |", "|---|---|---|---|---|---|"]
    for row in rows:
        d_test = base["test"] - row["test"]
        d_val = None if row["val"] is None else base["val"] - row["val"]
        if lm:
            cells = [f"{-row['test']:.4f} ({math.exp(-row['test']):.3f})", f"{d_test:+.4f}"]
            cells.append("-" if d_val is None else f"{d_val:+.4f}")
        elif fidelity:
            cells = [f"{row['test']:.5f}", f"{d_test:+.5f}", "-" if d_val is None else f"{d_val:+.5f}"]
        else:
            cells = [
                f"{100 * row['test']:.2f}%",
                f"{100 * d_test:+.2f}",
                "-" if d_val is None else f"{100 * d_val:+.2f}",
            ]
        cost = f"{row['compress_s']:.1f} ({row['calibration_passes']})" if "compress_s" in row else "-"
        out.append(f"| {row['setting']} | " + " | ".join(cells) + f" | {row['bytes']:,} | {cost} |")
    return "\n".join(out)


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from runs of the same task split by ``--only`` (run side by side): the first
    run's float32 row and every run's other rows; the load averages of all runs."""
    first = records[0]
    for r in records[1:]:
        if (r["task"], r["calibration_samples"], r["repair"]) != (
            first["task"],
            first["calibration_samples"],
            first["repair"],
        ):
            raise SystemExit("--merge: the records differ in task, calibration samples or repair")
        if r["rows"][0]["test"] != first["rows"][0]["test"]:
            raise SystemExit("--merge: the records' float32 rows differ")
    return {
        **first,
        "load_average": [r["load_average"] for r in records],
        "rows": first["rows"][:1] + [row for r in records for row in r["rows"][1:]],
    }


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tiny-lm", help="tiny-lm, fmnist-mobilenet, fmnist-resnet, minilm")
    parser.add_argument("--out", type=Path, help="JSON record (default docs/results/calibrated_<task>.json)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration samples (of the task's 512)")
    parser.add_argument(
        "--skip", type=int, default=0, help="calibration samples passed over first (another draw: --skip 256)"
    )
    parser.add_argument("--only", nargs="+", help="run only these settings (labels as in SETTINGS)")
    parser.add_argument(
        "--repair", nargs="*", default=[], help="repairs after compression, e.g. batchnorm (default: none)"
    )
    parser.add_argument("--no-val", action="store_true", help="score the test split only")
    parser.add_argument("--table", type=Path, help="only print the table of this JSON record")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="join these records of one task into --out (rows in order)"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.merge:
        record = merge([json.loads(p.read_text()) for p in args.merge])
        (args.out or Path(f"docs/results/calibrated_{record['task']}.json")).write_text(json.dumps(record, indent=1))
        print(markdown(record))
        return
    torch.set_num_threads(1)  # one thread: on the shared 2-core machine two spin-wait (docs/tasks.md)
    record = run(args.task, args.calibration, args.only, tuple(args.repair), not args.no_val, args.skip)
    out = args.out or Path(f"docs/results/calibrated_{args.task}.json")
    out.write_text(json.dumps(record, indent=1))
    print(markdown(record))


if __name__ == "__main__":
    main()
