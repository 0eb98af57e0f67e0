"""Issue 18: does the budget bound the cost, and is ``auto``'s answer at least as small as the best
uniform setting? One ``tightfit.compress`` per arm on a benchmark task, ``finetune=None``:

- wall time of the run against ``budget`` x one evaluation's time (every call of the task's metric is
  timed, so "one evaluation" is the median call of the same run, and the calls are counted: baseline
  + probes + trials + final check);
- the answer's bytes, compression and test metric (the test split is read only here, after the search);
- the run's time breakdown (``Result.accounting["time"]`` where the code has it).

Each arm is one process (``--arm``); the same script runs against main's code (``PYTHONPATH=/work/main/src:.``)
for the "before" arm. Each run appends its row to the JSON list in ``--out``.

    nice -n 10 env PYTHONPATH=src:. /work/venv/bin/python benchmarks/budget_floor.py --task tiny-lm \\
        --search auto --arm after --val-batches 2 --out docs/results/budget_floor_tiny-lm.json
    PYTHONPATH=src:. /work/venv/bin/python benchmarks/budget_floor.py --table docs/results/budget_floor_tiny-lm.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch

LAYERS = {"tiny-lm": ["transformer.h.*"]}


class CountingMetric:
    """The task's validation metric, each call timed and counted."""

    def __init__(self, metric: Any) -> None:
        self.metric, self.seconds = metric, []

    def __call__(self, model: torch.nn.Module) -> float:
        started = time.perf_counter()
        value = self.metric(model)
        self.seconds.append(time.perf_counter() - started)
        return float(value)


def validation_metric(task: Any, batches: int | None) -> Any:
    """The task's validation metric, on its first ``batches`` batches (all with None): on the shared
    machine a full tiny-lm evaluation (512 sequences) took minutes of wall time at load 20."""
    if batches is None:
        return task.metric
    import tightfit

    subset = list(itertools.islice(task.val, batches))
    if task.name == "tiny-lm":
        from benchmarks.tasks.lm import negative_loss

        return tightfit.PerSample(negative_loss, subset)
    return tightfit.Accuracy(subset)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tightfit
    from benchmarks.tasks import load_task
    from tightfit import Quantize

    task = load_task(args.task)
    model = task.model()
    evaluate = CountingMetric(validation_metric(task, args.val_batches))
    bits = tuple(int(b) for b in args.bits.split(","))
    started = time.perf_counter()
    result = tightfit.compress(
        model,
        evaluate=evaluate,
        strategy=Quantize(bits=bits, layers=LAYERS.get(args.task)),
        constraint=tightfit.MaxDrop(args.max_drop),
        finetune=None,
        budget=args.budget,
        search=args.search,
        seed=args.seed,
        example_input=task.example_input,
        progress=False,
    )
    wall = time.perf_counter() - started
    one_eval = statistics.median(evaluate.seconds)
    test = float(task.test_metric(result.model))
    return {
        "task": args.task,
        "arm": args.arm,
        "search": args.search,
        "commit": args.commit
        or subprocess.run(
            ["git", "-C", os.path.dirname(tightfit.__file__), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "tightfit": os.path.dirname(tightfit.__file__),
        "bits": list(bits),
        "max_drop": args.max_drop,
        "budget": args.budget,
        "val_batches": args.val_batches,
        "wall_s": wall,
        "evaluations": len(evaluate.seconds),
        "one_evaluation_s": one_eval,
        "wall_over_budget_evaluations": wall / (args.budget * one_eval),
        "feasible": result.feasible,
        "size_bytes": result.size_bytes,
        "baseline_size_bytes": result.baseline_size_bytes,
        "compression": result.compression_ratio,
        "val_metric": result.metric,
        "baseline_val_metric": result.baseline_metric,
        "test_metric": test,
        "plan_bits": sorted({s.get("quantize", {}).get("bits") for s in result.plan.layers.values()})
        if result.plan
        else None,
        "accounting": result.accounting,
        "load": os.getloadavg(),
    }


def table(path: Path) -> None:
    """The arms as a markdown table. Probes = metric calls - budget - 2 (the original and the
    answer's re-measurement); probe and optimizer seconds are the run's own accounting."""
    rows = json.loads(path.read_text())
    print(
        "| arm | search | wall s | metric calls | probes | one evaluation s | wall / (budget x evaluation) | "
        "probes s | optimizer s | answer bytes | compression | bits | val metric | test metric | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = r["accounting"]
        print(
            f"| {r['arm']} ({r['commit']}) | {r['search']} | {r['wall_s']:.0f} | {r['evaluations']} | "
            f"{r['evaluations'] - r['budget'] - 2} | {r['one_evaluation_s']:.2f} | "
            f"{r['wall_over_budget_evaluations']:.2f} | {acc.get('probe_wall_s', 0):.0f} | "
            f"{acc.get('optimizer_wall_s', 0):.0f} | {r['size_bytes']:,} | {r['compression']:.2f}x | "
            f"{r['plan_bits']} | {r['val_metric']:.4f} | {r['test_metric']:.4f} | {r['load'][0]:.0f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="tiny-lm")
    p.add_argument("--search", default="auto")
    p.add_argument("--arm", default="after")
    p.add_argument("--bits", default="2,8")
    p.add_argument("--max-drop", type=float, default=0.02)
    p.add_argument("--budget", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-batches", type=int, help="validation batches the search reads (default: all)")
    p.add_argument("--commit", default="", help="the code's commit when it runs from a copy")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path)
    args = p.parse_args()
    if args.table is not None:
        return table(args.table)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    row = run(args)
    print(json.dumps(row))
    if args.out is not None:  # a JSON list, one row per arm
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
