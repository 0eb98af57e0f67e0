"""A digest of what five small `compress` runs store, to check that a refactor changed no behaviour.

Prints, per configuration, a hash of every trial's state, values, constraints, parameters and
user/system attributes (timings and worker names left out), the hash of the answer's file, its
bytes, metric and chosen trial, and a hash of the result's notes. Run it in two checkouts and
compare the lines (issue 15: main at 1845138 against the refactor branch):

    PYTHONPATH=src python benchmarks/behaviour_digest.py [full pareto bo seq nonzeros]

The digest of the answer's bytes changes with the file format (format 2 dropped the pickled
architecture), so compare checkouts that write the same format.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import optuna
import torch

import tightfit
from tightfit import Accuracy, FineTune, MaxDrop, Sequential
from tightfit.demo import digits_split, lenet_300_100, train

TIMING = {"duration_s", "search_time_s", "probe_s", "worker", "seconds", "traceback"}


def clean(value):
    """``value`` without timings (dict keys in TIMING), floats rounded to 9 digits."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return round(value, 9)
    return value


def digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def main() -> None:
    data = digits_split(0)
    torch.manual_seed(0)
    model = train(lenet_300_100(), data, epochs=3, seed=0)
    evaluate = Accuracy(data.loader("val", batch_size=512))
    finetune = FineTune(data.loader("train", shuffle=True), epochs=1)
    configs = {
        "full": dict(budget=4, search="tpe", finetune=finetune),
        "pareto": dict(budget=3, search="tpe", objective=("size", "metric")),
        "bo": dict(budget=5, search="bo"),
        "seq": dict(budget=6, search="tpe", finetune=finetune, evaluation=Sequential()),
        "nonzeros": dict(budget=3, search="random", objective="nonzeros", constraint=[MaxDrop(0.02)]),
    }
    for name in sys.argv[1:] or list(configs):
        with tempfile.TemporaryDirectory() as tmp:
            result = tightfit.compress(model, evaluate=evaluate, seed=1, run_dir=tmp, **configs[name])
            study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp}/study.db")
            rows = [
                (t.number, t.state.name, t.values, t.params, clean(t.user_attrs), clean(dict(t.system_attrs)))
                for t in study.trials
            ]
            answer = hashlib.sha256(result.artifact or b"").hexdigest()[:16]
            best = result.best_trial.number if result.best_trial else None
            print(
                f"{name} trials {digest(json.dumps(rows, default=str))} bytes {answer} {result.size_bytes} "
                f"{round(result.metric, 6)} best {best} notes {digest('|'.join(result.notes), 8)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
