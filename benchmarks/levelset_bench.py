"""Does ``search="levelset"`` find the global (uniform) sparsity a 50-point grid search finds, in at
most 10 evaluations? LeNet-300-100 on digits, the search benchmark's recipe, 10 seeds (the seed
sets the fine-tune's shuffling, so each seed is its own noisy problem).

    nice -n 10 python benchmarks/levelset_bench.py --seeds 0-9

The grid's answer is the largest feasible sparsity of ``linspace(0, 0.999, 50)``; levelset's is
the largest feasible sparsity among its evaluations. Writes benchmarks/results/levelset_vs_grid.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_bench import _evaluate_plan, _layers, _plan, _seeds, row_feasible, run_search  # noqa: E402
from search_tasks import task  # noqa: E402

OUT = Path(__file__).parent / "results" / "levelset_vs_grid.jsonl"
GRID = np.linspace(0.0, 0.999, 50)


def one_seed(seed: int) -> dict:
    torch.set_num_threads(1)
    t = task("lenet300100")
    layers = _layers(t.model)
    feasible = []
    for s in GRID:
        _, val = _evaluate_plan(t, _plan({n: float(s) for n in layers}), seed)
        feasible.append(row_feasible(t, val))
    grid_answer = float(GRID[np.flatnonzero(feasible).max()]) if any(feasible) else 0.0
    row = run_search("lenet300100", "levelset", 10, seed)
    # the largest feasible evaluation, like the grid's answer (not compress's final pick, which
    # passes over a lucky evaluation: search/pick.py)
    spars = [v["prune"]["sparsity"] for v in row["observed_plan"].values()] if row.get("observed_plan") else [0.0]
    levelset_answer = float(np.mean(spars))
    return dict(
        seed=seed,
        grid_answer=grid_answer,
        grid_feasible=[bool(f) for f in feasible],
        levelset_answer=levelset_answer,
        levelset_evals=row["evals"],
        within_002=abs(levelset_answer - grid_answer) <= 0.02 + 1e-9,
        levelset_search_s_mean=row["search_s_mean"],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task("lenet300100")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("fork").Pool(args.workers) as pool:
        for row in pool.imap_unordered(one_seed, _seeds(args.seeds)):
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("seed", "grid_answer", "levelset_answer", "within_002")}), flush=True)


if __name__ == "__main__":
    main()
