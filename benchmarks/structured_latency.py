"""StructuredPrune searched for latency against the best uniform channel ratio (issue 18).

    W=runs/sl-resnet; T=fmnist-resnet
    PYTHONPATH=src:. python benchmarks/structured_latency.py $T --arm uniform --work $W   # the arms may run
    PYTHONPATH=src:. python benchmarks/structured_latency.py $T --arm search --work $W    # in parallel
    PYTHONPATH=src:. python benchmarks/structured_latency.py $T --arm measure --work $W

Per task: (a) the largest uniform ratio (one ratio for every channel group) that meets
``MaxDrop(--drop)`` after the per-trial recovery recipe (``FineTune``, ``--steps`` Adam steps at
``--lr``), found by bisection over [0, 0.75]; (b) ``compress(StructuredPrune(...),
objective="latency", constraint=MaxDrop(--drop), finetune=recipe, budget=--budget)``, latency
timed at batch 32 on one thread. Then the original and both answers are timed at batch 32 in
interleaved rounds (each round times every model, in a rotated order; the speedup of a round is
the original's time in that round over the model's), and the answers' test accuracy is measured
on the 10,000 test images (read by nothing before; the original's is its training record's). Writes docs/results/structured_latency_<task>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tightfit
from benchmarks.tasks import load_task
from tightfit.measure.latency import Latency, with_batch_size
from tightfit.operators import Compose, Plan, StructuredPrune, apply_plan_inplace

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
BATCH = 32


def recipe(task, steps: int, lr: float, schedule: str = "constant") -> tightfit.FineTune:
    return tightfit.FineTune(task.train, epochs=1, max_steps=steps, lr=lr, schedule=schedule)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def file_bytes(model: torch.nn.Module, plan: Plan | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return tightfit.save(model, os.path.join(tmp, "m.tfz"), plan=plan)


def uniform(task, original, op: StructuredPrune, ratio: float, fine_tune, seed: int):
    """The model with every group at ``ratio``, fine-tuned with the recipe (seeded as compress does)."""
    strategy = Compose([op])
    plan = Plan.from_strategy(strategy, {g: {"structured_prune": {"ratio": ratio}} for g in op.groups})
    model = apply_plan_inplace(plan, copy.deepcopy(original), strategy) if ratio > 0 else copy.deepcopy(original)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fine_tune(model)
    model.eval()
    return model, plan


def best_uniform(task, original, base_val: float, args, log: list) -> dict[str, Any]:
    op = StructuredPrune(example_input=task.example_input, round_to=args.round_to)
    op.prepare(original, task.example_input)
    lo, hi, best = 0.0, 0.75, None
    for _ in range(args.bisect):
        mid = (lo + hi) / 2
        started = time.perf_counter()
        model, plan = uniform(task, original, op, mid, recipe(task, args.steps, args.lr, args.schedule), args.seed)
        val = task.metric(model)
        ok = base_val - val <= args.drop
        log.append({"ratio": mid, "val": val, "feasible": ok, "wall_s": time.perf_counter() - started})
        print("uniform", json.dumps(log[-1]), flush=True)
        if ok:
            lo, best = mid, (model, plan, val)
        else:
            hi = mid
    if best is None:  # no pruned ratio met the constraint: the original, fine-tuned, is the uniform answer
        model, plan = uniform(task, original, op, 0.0, recipe(task, args.steps, args.lr, args.schedule), args.seed)
        best = (model, plan, task.metric(model))
    return {"ratio": lo, "model": best[0], "plan": best[1], "val": best[2], "groups": len(op.groups)}


def search(task, original, args) -> dict[str, Any]:
    op = StructuredPrune(round_to=args.round_to)
    latency = Latency(task.example_input, batch_size=BATCH, threads=1)
    result = tightfit.compress(
        original,
        evaluate=task.metric,
        strategy=op,
        objective="latency",
        constraint=[tightfit.MaxDrop(args.drop)],
        finetune=recipe(task, args.steps, args.lr, args.schedule),
        budget=args.budget,
        example_input=task.example_input,
        latency=latency,
        seed=args.seed,
        search=args.search,
        run_dir=str(args.work / f"run-{args.search}"),
    )
    trials = [
        {
            "number": t.number,
            "state": t.state,
            "metric": t.measurement.metric if t.measurement else None,
            "latency_ms": t.measurement.latency_ms if t.measurement else None,
            "feasible": t.feasible,
            "duration_s": t.duration_s,
            "search_time_s": t.search_time_s,
            "probe_s": t.probe_s,
            "plan": t.plan.to_dict() if t.plan is not None else None,
        }
        for t in result.trials
    ]
    return {
        "model": result.model.eval(),
        "plan": result.plan,
        "val": result.metric,
        "trials": trials,
        "feasible": result.feasible,
        "accounting": result.accounting,
        "message": result.message,
    }


def interleaved(models: dict[str, torch.nn.Module], example, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Per model: median ms per batch, and the speedup over the original (median and quartiles of
    the per-round ratios, each round timing every model)."""
    x = with_batch_size(example, BATCH)
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(3):
                m(x)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                started = time.perf_counter()
                for _ in range(calls):
                    models[n](x)
                times[n].append((time.perf_counter() - started) / calls * 1e3)
    out = {}
    for n in names:
        ratios = sorted(a / b for a, b in zip(times["original"], times[n]))
        q = statistics.quantiles(ratios, n=4)
        out[n] = {
            "ms": statistics.median(times[n]),
            "speedup": statistics.median(ratios),
            "speedup_q1": q[0],
            "speedup_q3": q[2],
        }
    return out


def run_arm(task, original, base_val: float, args) -> None:
    """One arm (``uniform`` or ``search``), its answer saved as ``.tfz`` with a JSON of its numbers,
    so the two arms can run in separate processes and be timed together afterwards."""
    started = time.perf_counter()
    if args.arm == "uniform":
        log: list = []
        arm = best_uniform(task, original, base_val, args, log)
        arm["bisection"] = log
    else:
        arm = search(task, original, args)
    arm["wall_s"] = time.perf_counter() - started
    model, plan = arm.pop("model"), arm.pop("plan")
    arm["bytes"] = tightfit.save(model, str(args.work / f"{args.arm}.tfz"), plan=plan)
    arm["params"] = params(model)
    arm["load"] = os.getloadavg()
    (args.work / f"{args.arm}.json").write_text(json.dumps(arm, indent=1, default=str))
    print(json.dumps({k: v for k, v in arm.items() if k not in ("trials", "bisection")}, default=str), flush=True)


def measure(task, original, base_val: float, args) -> None:
    """The original and the saved answers timed together in interleaved rounds; test accuracy."""
    arms = {}
    for name in ("uniform", "search"):
        if (args.work / f"{name}.json").exists():
            arm = json.loads((args.work / f"{name}.json").read_text())
            arm["model"] = tightfit.load(str(args.work / f"{name}.tfz"), model=task.build())
            arms[name] = arm
    row: dict[str, Any] = {
        "task": args.task,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "load_at_timing": os.getloadavg(),
        "threads": 1,
        "batch": BATCH,
    }
    timed = interleaved(
        {"original": original, **{k: a["model"] for k, a in arms.items()}}, task.example_input, args.rounds, args.calls
    )
    row["original"] = {
        "params": params(original),
        "bytes": file_bytes(original, None),
        "val": base_val,
        # the training run's record of the same test split (10,000 images), not measured again here
        "test": task.meta.get("test_metric"),
        **timed["original"],
    }
    for name, arm in arms.items():
        model = arm.pop("model")
        row[name] = {**arm, "test": task.test_metric(model), **timed[name]}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"structured_latency_{args.task}{args.tag}.json"
    path.write_text(json.dumps(row, indent=1, default=str))
    keys = ("params", "bytes", "val", "test", "ms", "speedup", "speedup_q1", "speedup_q3", "wall_s", "ratio")
    print(json.dumps({k: {f: row[k].get(f) for f in keys} for k in ("original", *arms)}, indent=1))


def timing_only(task, original, args) -> None:
    """Saved answers (``--answers``) timed together with the original, more rounds, no accuracy."""
    models = {"original": original}
    for path in args.answers:
        models[str(path)] = tightfit.load(str(path), model=task.build())
    timed = interleaved(models, task.example_input, args.rounds, args.calls)
    rows = {name: {"params": params(models[name]), **row} for name, row in timed.items()}
    result = {
        "task": args.task,
        "rounds": args.rounds,
        "calls": args.calls,
        "batch": BATCH,
        "threads": 1,
        "load": os.getloadavg(),
        "models": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"structured_latency_{args.task}{args.tag}_timing.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task")
    parser.add_argument("--arm", choices=("uniform", "search", "measure", "time"), required=True)
    parser.add_argument("--answers", type=Path, nargs="*", default=[], help="--arm time: saved .tfz answers")
    parser.add_argument("--work", type=Path, required=True, help="folder for the arms' saved answers")
    parser.add_argument("--budget", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--drop", type=float, default=0.005)
    parser.add_argument("--round-to", type=int, default=None)
    parser.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    parser.add_argument("--bisect", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    task = load_task(args.task)
    original = task.model()
    base_val = task.meta.get("val_metric") if args.arm in ("measure", "time") else task.metric(original)
    if args.arm == "measure":
        measure(task, original, base_val, args)
    elif args.arm == "time":
        timing_only(task, original, args)
    else:
        run_arm(task, original, base_val, args)


if __name__ == "__main__":
    main()
