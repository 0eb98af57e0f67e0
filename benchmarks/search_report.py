"""Markdown tables from the search benchmark's rows (medians, spread = min-max over seeds).

    python benchmarks/search_report.py                      # results/search_traces.jsonl (current)
    python benchmarks/search_report.py results/search_runs.jsonl   # the previous session's rows

Rows written with ``--trace`` also carry what the previous final pick (the best *observed*
feasible trial) would have returned from the same run: the last two columns.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "search_traces.jsonl"
ORDER = ["auto", "bo", "levelset", "mads", "olmp", "cmaes", "tpe", "random", "uniform_bisect", "global_bisect", "imp"]


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        if "error" in r:
            continue
        groups[(r["task"], r["method"], r["budget"])].append(r)
    out = []
    for task_name in sorted({k[0] for k in groups}):
        out.append(f"\n### {task_name}\n")
        out.append(
            "| method | budget | seeds | CR nonzeros median [min-max] | CR bytes median | feasible runs | test acc % mean | test drop pp mean | evals (feasible) median | wall s median | optimizer s/suggestion median (max) | old pick: CR median [min-max] | old pick: test drop pp mean |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        keys = sorted(
            (k for k in groups if k[0] == task_name), key=lambda k: (ORDER.index(k[1]) if k[1] in ORDER else 99, k[2])
        )
        for key in keys:
            rs = groups[key]
            cr = [r["cr_nonzeros"] for r in rs]
            crb = [r["cr_bytes"] for r in rs]
            test = [100 * r["test_acc"] for r in rs]
            drop = [100 * (r["base_test_acc"] - r["test_acc"]) for r in rs]
            st = [r["search_s_mean"] for r in rs if r.get("search_s_mean") is not None]
            smax = [r["search_s_max"] for r in rs if r.get("search_s_max") is not None]
            budget = "bisect (11)" if key[1].endswith("bisect") else "rounds" if key[1] == "imp" else key[2]
            old = [r["observed_pick"] for r in rs if r.get("observed_pick")]
            if old and len(old) == len(rs):
                ocr = [o["cr_nonzeros"] for o in old]
                odrop = [100 * (r["base_test_acc"] - o["test_acc"]) for r, o in zip(rs, old)]
                old_cols = (
                    f"{statistics.median(ocr):.2f} [{min(ocr):.2f}-{max(ocr):.2f}] | {statistics.mean(odrop):+.2f}"
                )
            else:
                old_cols = "- | -"
            out.append(
                f"| {key[1]} | {budget} | {len(rs)} | {statistics.median(cr):.2f} [{min(cr):.2f}-{max(cr):.2f}] | "
                f"{statistics.median(crb):.2f} | {sum(r['feasible'] for r in rs)}/{len(rs)} | {statistics.mean(test):.2f} | "
                f"{statistics.mean(drop):+.2f} | {statistics.median([r['evals'] for r in rs]):.0f} "
                f"({statistics.median([r['feasible_evals'] for r in rs]):.0f}) | {statistics.median([r['wall_s'] for r in rs]):.0f} | "
                f"{_f(statistics.median(st) if st else None, '{:.3f}')} ({_f(max(smax) if smax else None, '{:.2f}')}) | {old_cols} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(table(rows))
