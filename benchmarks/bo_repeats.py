"""How often ``search="auto"`` (``bo``) spends a trial on a plan it has measured before.

    PYTHONPATH=src python benchmarks/bo_repeats.py --task digits --mode full --seeds 0 1 2
    PYTHONPATH=src python benchmarks/bo_repeats.py --task digits --mode sequential --seeds 0 1 2 3 4
    # the code before the guard: a worktree at that commit, its src first on the path
    git worktree add /tmp/before 361e173 && PYTHONPATH=/tmp/before/src python benchmarks/bo_repeats.py --label 361e173 ...

Runs the cheap-evaluation benchmark's searches (benchmarks/cheap_eval.py: budget 30) with a run
directory and counts the trials whose plan repeats an earlier trial's: every float setting within
1e-3 and the same choices (bit widths). With the run's seed a repeated plan measures the same.
Prints one line per run and appends it to benchmarks/results/bo_repeats.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import cheap_eval
import optuna

import tightfit
from tightfit.pipeline import compress

RESULTS = Path(__file__).parent / "results"


def repeats(trials: list[optuna.trial.FrozenTrial]) -> int:
    def same(a: dict, b: dict) -> bool:
        return all(abs(a[k] - b[k]) < 1e-3 if isinstance(a[k], float) else a[k] == b[k] for k in a)

    return sum(any(same(t.params, e.params) for e in trials[:i]) for i, t in enumerate(trials))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("digits", "mnist1d"), default="digits")
    ap.add_argument("--mode", choices=("full", "sequential"), default="full")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label", default="", help="which code ran (e.g. a commit), stored with each row")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    split, model, recipe = cheap_eval.setup(args.task, 3 if args.task == "mnist1d" else None)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            compress(
                copy.deepcopy(model),
                evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
                budget=30,
                search="auto",
                seed=seed,
                example_input=split.x_val[:1],
                run_dir=Path(tmp) / "run",
                progress=False,
                evaluation=tightfit.Sequential() if args.mode == "sequential" else None,
                **recipe,
            )
            study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{Path(tmp) / 'run' / 'study.db'}")
            trials = study.get_trials()
        row = {
            "task": args.task,
            "mode": args.mode,
            "seed": seed,
            "trials": len(trials),
            "repeats": repeats(trials),
            "label": args.label,
        }
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / "bo_repeats.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
