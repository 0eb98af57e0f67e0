"""Which compression can any plan hold on *test*? The attainable frontier of the search benchmark.

Reads traced rows (``search_bench.py --trace``: every fine-tuned plan of every run, with its
validation and test accuracy and a second fine-tune of the same plan) and bins all plans of one
task by nonzero compression ratio. For each bin: how many plans met the constraint on validation
(what a search sees), how many held it on test with the run's fine-tune and with both fine-tunes,
and their mean test drop. Then the issue-3 targets computed from the same rows (1.5x the budget-30
median of TPE and of the better bisection, from the first file's runs) next to the largest compression any plan held on test.

    python benchmarks/search_frontier.py                                   # search_traces.jsonl
    python benchmarks/search_frontier.py results/search_traces.jsonl results/search_traces_explore.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAX_DROP_PP = 0.5  # the benchmark's constraint, in points (search_tasks.MAX_DROP)
EDGES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 15, 30, 1e9)
EPS = 1e-9


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r]


def plans(rows: list[dict], task: str, total: int) -> dict[tuple, dict]:
    """Every fine-tuned plan of ``task`` (deduplicated on its sparsities and the run's seed), with
    drops in points against the original."""
    out = {}
    for r in rows:
        if r["task"] != task or "trials" not in r:
            continue
        for t in r["trials"]:
            if not t.get("objective") or t.get("test") is None:
                continue
            key = (tuple(round(p, 6) for p in t["plan"]), r["seed"])
            out[key] = dict(
                cr=total / t["objective"],
                val_drop=100 * (r["base_val_acc"] - t["val"]),
                test_drop=100 * (r["base_test_acc"] - t["test"]),
                test2_drop=100 * (r["base_test_acc"] - t["test2"]) if t.get("test2") is not None else None,
            )
    return out


def frontier_table(points: list[dict]) -> str:
    lines = [
        f"| CR nonzeros | plans | feasible on validation | held on test (<= {MAX_DROP_PP} pt) | held on test with both fine-tunes | test drop pp mean | test drop pp median |",
        "|---|---|---|---|---|---|---|",
    ]
    for lo, hi in zip(EDGES, EDGES[1:]):
        sel = [p for p in points if lo <= p["cr"] < hi]
        if not sel:
            continue
        n = len(sel)
        val_ok = sum(p["val_drop"] <= MAX_DROP_PP + EPS for p in sel)
        test_ok = sum(p["test_drop"] <= MAX_DROP_PP + EPS for p in sel)
        both = sum(
            p["test_drop"] <= MAX_DROP_PP + EPS and p["test2_drop"] is not None and p["test2_drop"] <= MAX_DROP_PP + EPS
            for p in sel
        )
        drops = [p["test_drop"] for p in sel]
        label = f"{lo:g}-{hi:g}" if hi < 1e8 else f">= {lo:g}"
        lines.append(
            f"| {label} | {n} | {val_ok} ({val_ok / n:.0%}) | {test_ok} ({test_ok / n:.0%}) | {both} ({both / n:.0%}) "
            f"| {statistics.mean(drops):+.2f} | {statistics.median(drops):+.2f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict], task: str) -> dict[str, float]:
    med = defaultdict(list)
    for r in rows:
        if (
            r["task"] == task
            and r.get("cr_nonzeros")
            and r["method"] in ("tpe", "global_bisect", "uniform_bisect")
            and (r["method"] != "tpe" or r["budget"] == 30)
        ):
            med[r["method"]].append(r["cr_nonzeros"])
    out = {m: statistics.median(v) for m, v in med.items()}
    if out:
        out["target (1.5 x the largest)"] = 1.5 * max(out.values())
    return out


def weights_total(task: str) -> int:
    """Prunable weights of the task's architecture (no training needed to count them)."""
    from search_tasks import mnist1d_mlp  # noqa: PLC0415
    from torch import nn

    from tightfit.demo import lenet_300_100  # noqa: PLC0415
    from tightfit.demo.models import LeNet5  # noqa: PLC0415

    model = {"lenet300100": lenet_300_100, "lenet5": LeNet5, "mnist1d_mlp": mnist1d_mlp}[task]()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def main(argv: list[str]) -> None:
    paths = [Path(a) if Path(a).exists() else RESULTS / Path(a).name for a in argv] or [RESULTS / "search_traces.jsonl"]
    rows = load(paths)
    current = load(paths[:1])  # the targets come from the first file's runs (the current code's)
    for task in sorted({r["task"] for r in rows if "trials" in r}):
        total = weights_total(task)
        points = list(plans(rows, task, total).values())
        print(f"\n#### {task}: {len(points)} fine-tuned plans from {', '.join(p.name for p in paths)}\n")
        print(frontier_table(points))
        held = [p for p in points if p["test_drop"] <= MAX_DROP_PP + EPS]
        both = [p for p in held if p["test2_drop"] is not None and p["test2_drop"] <= MAX_DROP_PP + EPS]
        print()
        for name, value in targets(current, task).items():
            print(f"- budget-30 median CR, {name}: {value:.2f}x")
        if held:
            best = max(held, key=lambda p: p["cr"])
            print(
                f"- largest CR any plan held on test: {best['cr']:.2f}x (validation drop {best['val_drop']:+.2f}, test drop {best['test_drop']:+.2f})"
            )
        if both:
            best = max(both, key=lambda p: p["cr"])
            print(f"- largest CR held on test with both fine-tunes: {best['cr']:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1:])
