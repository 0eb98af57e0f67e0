"""A search over per-layer SparseGPT sparsities without training, each layer fit to its own outputs
(the published method) or to the original model's (``target="original"``): how far does the
better operator carry the search's answer? One ``tightfit.compress`` per arm on a benchmark task
(docs/tasks.md), the calibrated pass replayed for every trial; the answer read on the test split.

    nice -n 5 env PYTHONPATH=src:. OMP_NUM_THREADS=1 python benchmarks/calibrated_search.py \\
        --task fmnist-resnet --target original --out docs/results/calibrated_search_fmnist-resnet_original.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tightfit  # noqa: E402
from benchmarks.calibrated_tasks import model_inputs  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402


def run(task_name: str, target: str, budget: int, drop: float, samples: int, seed: int) -> dict:
    torch.manual_seed(0)
    task = load_task(task_name)
    model = task.model().eval()
    calibration = model_inputs(task.calibration, samples)
    strategy = tightfit.Prune((0.3, 0.95), method="sparsegpt", target=target)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = tightfit.compress(
            model,
            evaluate=task.metric,
            strategy=strategy,
            constraint=tightfit.MaxDrop(drop),
            budget=budget,
            calibration=calibration,
            finetune=None,
            seed=seed,
            run_dir=Path(tmp) / "run",
        )
    seconds = time.perf_counter() - start
    base_test = float(task.test_metric(model))
    test = float(task.test_metric(result.model)) if result.feasible else None
    record = {
        "task": task_name,
        "target": target,
        "budget": budget,
        "max_drop": drop,
        "calibration_samples": samples,
        "seed": seed,
        "feasible": result.feasible,
        "val": result.metric,
        "baseline_val": result.baseline_metric,
        "test": test,
        "baseline_test": base_test,
        "size_bytes": result.size_bytes,
        "baseline_size_bytes": result.baseline_size_bytes,
        "nonzero_ratio": result.nonzero_ratio,
        "trials": len(result.trials),
        "wall_s": round(seconds, 1),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fmnist-resnet")
    parser.add_argument("--target", default="original", choices=["layer", "original"])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--max-drop", type=float, default=0.005)
    parser.add_argument("--calibration", type=int, default=256, help="calibration samples (of the task's 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: on the shared 2-core machine two spin-wait (docs/tasks.md)
    record = run(args.task, args.target, args.budget, args.max_drop, args.calibration, args.seed)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
