"""Issue 17, item 5's done-when line: ``objective="metric"`` under a size budget of 1/6 of float32
is more accurate than the best uniform setting of that size and than the sensitivity-greedy
allocation, at budget 30.

Per task: F = the bytes ``tightfit.save`` writes for the float32 model (``to_bytes``); the budget is
``MaxSize(F // 6)``; the space ``Quantize(bits=(2, 3, 4, 5, 6, 8), group_size=128)``, round to
nearest (GPTQ costs 30-110 s per plan on these tasks, docs/results/calibrated_*.json, which would
double or triple a 30-trial run). tiny-lm: only the blocks (``transformer.h.*``), as
benchmarks/calibrated_tasks.py. Arms, each scored on the validation split (what decides) and the
test split (what is reported):

- ``uniform``: every uniform bit width of the space; the most accurate on validation that fits;
- ``greedy``: ``tightfit.search.greedy.greedy_allocation`` (ModelOpt's ``auto_quantize`` done
  greedily) with the sensitivity measured as ModelOpt does, on the calibration data: minus the KL
  divergence of the outputs from the float model's on the calibration samples (scanning with the
  validation metric would cost a full evaluation per layer and level: 260 on fmnist-mobilenet);
- ``warm``: ``compress(objective="metric", search="auto", budget=30, finetune=None, calibration=...)``,
  which starts from the sensitivity allocation, then searches locally around the best trial
  (tightfit.search.warm_metric, tightfit.search.swap);
- ``plain``: the same with ``search="tpe"`` (no warm start).

    nice -n 10 env PYTHONPATH=src:. /work/venv/bin/python benchmarks/metric_objective.py --task tiny-lm
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tightfit  # noqa: E402
from benchmarks.calibrated_tasks import LAYERS, model_inputs  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from tightfit import Quantize  # noqa: E402
from tightfit.evaluation.divergence import OutputDivergence  # noqa: E402
from tightfit.export import to_bytes  # noqa: E402
from tightfit.operators.compose import as_strategy  # noqa: E402
from tightfit.operators.plan import apply_plan_inplace  # noqa: E402
from tightfit.search.greedy import greedy_allocation  # noqa: E402
from tightfit.search.warm_metric import WARM_ATTR  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)
GROUP = 128


class Scored:
    """The task's metric on the first ``val_batches`` validation batches (what every arm's decisions
    read: the machine was shared at load 10-25, where a full tiny-lm validation pass took ~2 min)
    and on the first ``test_batches`` test batches (None: all), which only report."""

    def __init__(self, task: Any, val_batches: int | None, test_batches: int | None) -> None:
        self.metric = _subset(task, task.val, task.metric, val_batches)
        self.test_metric = _subset(task, task.test, task.test_metric, test_batches)


def _subset(task: Any, loader: Any, full: Any, batches: int | None) -> Any:
    if batches is None:
        return full
    head = list(itertools.islice(loader, batches))
    if task.name == "tiny-lm":
        from benchmarks.tasks.lm import negative_loss

        return tightfit.PerSample(negative_loss, head)
    return tightfit.Accuracy(head)


def strategy(layers: list[str] | None, bits: Any = BITS) -> Quantize:
    return Quantize(bits=bits, group_size=GROUP, layers=layers)


def uniform_arm(task: Any, model: torch.nn.Module, layers: Any, limit: int) -> dict[str, Any]:
    t0, rows, evaluations = time.perf_counter(), [], 0
    for bits in BITS:
        out = tightfit.compress_once(model, strategy(layers, bits))
        size = len(to_bytes(out.model, out.plan))
        row: dict[str, Any] = {"bits": bits, "bytes": size, "fits": size <= limit}
        if size <= limit:
            row["val"] = float(task.metric(out.model))
            evaluations += 1
        rows.append(row)
        print(f"  uniform {bits} bit: {row}", flush=True)
    best = max((r for r in rows if r["fits"]), key=lambda r: r["val"])
    best_model = tightfit.compress_once(model, strategy(layers, best["bits"])).model
    return {
        "arm": "uniform",
        "setting": f"{best['bits']} bit, group {GROUP}",
        "val": best["val"],
        "test": float(task.test_metric(best_model)),
        "bytes": best["bytes"],
        "wall_s": time.perf_counter() - t0,
        "evaluations": evaluations,
        "rows": rows,
    }


def greedy_arm(task: Any, model: torch.nn.Module, layers: Any, limit: int, calibration: list) -> dict[str, Any]:
    t0 = time.perf_counter()
    divergence = OutputDivergence(model, calibration)
    result = greedy_allocation(model, strategy(layers), lambda m: -divergence(m), tightfit.MaxSize(limit))
    search_s = time.perf_counter() - t0
    chosen = apply_plan_inplace(result.plan, copy.deepcopy(model), as_strategy(strategy(layers)))
    bits = [s["quantize"]["bits"] for s in result.plan.layers.values() if "quantize" in s]
    return {
        "arm": "greedy",
        "val": float(task.metric(chosen)),
        "test": float(task.test_metric(chosen)),
        "bytes": len(to_bytes(chosen, result.plan)),
        "feasible": result.feasible,
        "wall_s": time.perf_counter() - t0,
        "search_s": search_s,
        "evaluations": 1,  # validation evaluations; its scan read the calibration samples only
        "calibration_probes": divergence.calls,
        "calibration_samples": divergence.samples,
        "bits_histogram": {b: bits.count(b) for b in sorted(set(bits))},
    }


def search_arm(
    task: Any, model: torch.nn.Module, layers: Any, limit: int, calibration: list, search: str, seed: int, budget: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = tightfit.compress(
            model,
            evaluate=task.metric,
            strategy=strategy(layers),
            objective="metric",
            constraint=tightfit.MaxSize(limit),
            search=search,
            budget=budget,
            finetune=None,
            calibration=calibration,
            seed=seed,
            progress=False,
            run_dir=Path(tmp) / "run",
        )
        study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{Path(tmp) / 'run' / 'study.db'}")
        warm = study.user_attrs.get(WARM_ATTR)
    wall = time.perf_counter() - t0
    done = [t for t in result.trials if t.state == "COMPLETE"]
    feasible = [t for t in done if t.feasible]
    best = result.best_trial
    best_at = next((i for i, t in enumerate(done) if best is not None and t.number == best.number), None)
    return {
        "arm": "warm" if search == "auto" else search,
        "search": search,
        "seed": seed,
        "val": float(result.metric),
        "test": float(task.test_metric(result.model)),
        "bytes": result.size_bytes,
        "feasible": result.feasible,
        "wall_s": wall,
        "evaluations": len(done),
        "feasible_trials": len(feasible),
        "best_trial_position": best_at,
        "trial_vals": [t.measurement.metric if t.measurement else None for t in done],
        "trial_feasible": [t.feasible for t in done],
        "warm_start": None if warm is None else {k: warm[k] for k in ("probes", "samples", "seconds")},
        "warm_plans": None if warm is None else len(warm["params"]),
    }


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tiny-lm")
    parser.add_argument("--arms", nargs="+", default=["uniform", "greedy", "warm:0", "plain:0", "warm:1"])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=128, help="calibration samples (of the task's 512)")
    parser.add_argument("--val-batches", type=int, help="validation batches the arms decide on (default: all)")
    parser.add_argument("--test-batches", type=int, help="test batches reported (default: all)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON records (one task)")
    args = parser.parse_args()
    if args.table:
        records = [json.loads(p.read_text()) for p in args.table]
        merged = {**records[0], "arms": [a for r in records for a in r["arms"]]}
        order = {"uniform": 0, "greedy": 1, "warm": 2, "tpe": 3}
        merged["arms"].sort(key=lambda a: (order.get(a["arm"], 9), a.get("seed") or 0))
        print(markdown(merged))
        return
    torch.set_num_threads(1)  # one thread: on the shared 2-core machine two spin-wait (docs/tasks.md)
    torch.manual_seed(0)
    raw = load_task(args.task)
    task = Scored(raw, args.val_batches, args.test_batches)
    model = raw.model().eval()
    layers = LAYERS.get(args.task)
    calibration = model_inputs(raw.calibration, args.calibration)
    float_bytes = len(to_bytes(model))
    limit = float_bytes // 6
    out = args.out or Path(f"docs/results/metric_objective_{args.task}.json")
    record: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    record.update(
        task=args.task,
        metric=raw.metric_name,
        val_batches=args.val_batches,
        test_batches=args.test_batches,
        eval_batch_size=raw.val.batch_size,
        float32={"bytes": float_bytes, "val": float(task.metric(model)), "test": float(task.test_metric(model))},
        limit_bytes=limit,
        space=f"Quantize(bits={BITS}, group_size={GROUP}, method='rtn', layers={layers})",
        budget=args.budget,
        calibration_samples=args.calibration,
    )
    record.setdefault("arms", [])
    print(f"{args.task}: float32 {record['float32']}, limit {limit} B", flush=True)
    for spec in args.arms:
        name, _, seed = spec.partition(":")
        started_load = os.getloadavg()
        if name == "uniform":
            row = uniform_arm(task, model, layers, limit)
        elif name == "greedy":
            row = greedy_arm(task, model, layers, limit, calibration)
        else:
            search = {"warm": "auto", "plain": "tpe"}[name]
            row = search_arm(task, model, layers, limit, calibration, search, int(seed or 0), args.budget)
        row["load_average_start"] = started_load
        row["load_average_end"] = os.getloadavg()
        record["arms"] = [a for a in record["arms"] if (a["arm"], a.get("seed")) != (row["arm"], row.get("seed"))]
        record["arms"].append(row)
        out.write_text(json.dumps(record, indent=1))
        print(f"  {spec}: " + json.dumps({k: v for k, v in row.items() if k not in ("rows", "trial_vals")}), flush=True)


def markdown(record: dict[str, Any]) -> str:
    """One table per task: each arm's validation (the subset the arms decide on) and test metric,
    file bytes against the limit, wall time and validation evaluations."""
    lm = record["task"] == "tiny-lm"

    def fmt(v: float) -> str:
        return f"{-v:.4f}" if lm else f"{100 * v:.2f}%"

    name = "loss (nats/byte)" if lm else "accuracy"
    out = [
        f"| arm | val {name} | test {name} | file bytes (limit {record['limit_bytes']:,}) | wall s | val evaluations |",
        "|---|---|---|---|---|---|",
        f"| float32 | {fmt(record['float32']['val'])} | {fmt(record['float32']['test'])} | "
        f"{record['float32']['bytes']:,} | - | - |",
    ]
    for a in record["arms"]:
        label = {"uniform": f"uniform ({a.get('setting')})", "greedy": "sensitivity-greedy"}.get(a["arm"], a["arm"])
        if a["arm"] in ("warm", "tpe"):
            label = f"{'metric search, warm start' if a['arm'] == 'warm' else 'metric search, plain TPE'} (seed {a['seed']})"
        out.append(
            f"| {label} | {fmt(a['val'])} | {fmt(a['test'])} | {a['bytes']:,} | {a['wall_s']:.0f} | {a['evaluations']} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
