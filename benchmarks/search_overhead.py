"""The optimizer's own time per suggestion of ``search="bo"`` in a 50-dimensional space with 100
trials: a synthetic problem (no training), timed under the shared lock.

    flock /tmp/tightfit-timing.lock python benchmarks/search_overhead.py [METHOD] [--dims D] [--trials N] [--tag TAG]

Prints one JSON line (also appended to benchmarks/results/search_overhead.jsonl): wall seconds per
suggestion (the trials' ``search_time_s``) of the last 10 trials (91-100) and of all, and the
process's CPU seconds per trial for the last 10 (less sensitive to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from tightfit.operators import Compose, Prune
from tightfit.operators.base import Hyperparameter
from tightfit.search import SearchSpace, run_trials
from tightfit.search.context import SearchContext
from tightfit.search.loop import TrialOutcome
from tightfit.search.space import Dimension

OUT = Path(__file__).parent / "results" / "search_overhead.jsonl"


def main(method: str = "bo", D: int = 50, N: int = 100, tag: str = "") -> None:
    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(0)
    sizes = rng.integers(100, 10_000, D)
    sens = rng.uniform(0.5, 5.0, D)
    dims = tuple(Dimension(f"layer{i}", "prune", Hyperparameter("sparsity", low=0.0, high=0.99)) for i in range(D))
    space = SearchSpace(Compose([Prune()]), dims, {f"layer{i}": {"prune": {}} for i in range(D)})

    def evaluate(plan, trial):
        s = np.array([plan.layers[f"layer{i}"]["prune"]["sparsity"] for i in range(D)])
        drop = float((sens * s**4).sum() / D)
        return TrialOutcome(objective=float((sizes * (1 - s)).sum()), constraints=[drop - 0.3])

    study = optuna.create_study()
    cpu: list[float] = []
    last = [time.process_time()]

    def on_trial(_trial) -> None:  # CPU seconds of this process per trial (suggestion + trivial evaluation)
        now = time.process_time()
        cpu.append(now - last[0])
        last[0] = now

    run_trials(
        study,
        space,
        evaluate,
        budget=N,
        method=method,
        seed=0,
        context=SearchContext(space=space, budget=N),
        on_trial=on_trial,
    )
    times = [t.user_attrs["search_time_s"] for t in study.get_trials()]
    # search quality on the synthetic problem: the smallest objective among feasible trials
    feasible = [t for t in study.get_trials() if t.value is not None and max(t.constraints.values()) <= 0]
    row = dict(
        method=method,
        tag=tag,
        dims=D,
        trials=N,
        torch_threads=2,
        last10_mean_s=statistics.mean(times[-10:]),
        last10_max_s=max(times[-10:]),
        all_mean_s=statistics.mean(times),
        all_max_s=max(times),
        last10_cpu_mean_s=statistics.mean(cpu[-10:]),
        last10_cpu_max_s=max(cpu[-10:]),
        best_feasible_objective=min((t.value for t in feasible), default=None),
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", nargs="?", default="bo")
    parser.add_argument("--dims", type=int, default=50)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--tag", default="", help="a label stored with the row (e.g. the code version)")
    args = parser.parse_args()
    main(args.method, args.dims, args.trials, args.tag)
