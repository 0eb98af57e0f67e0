"""How well the stage of a fine-tune predicts its end (issue 5): could a sharper predictor stop more
candidates at the stage without stopping the feasible ones?

    PYTHONPATH=src nice -n 10 python benchmarks/stage_predictors.py collect --task digits --seeds 0 1 2 3 4
    PYTHONPATH=src python benchmarks/stage_predictors.py analyze --task digits

``collect``: cheap searches (budget 30, ``search="auto"``) in which nothing is stopped
(``promote_probability=0``, ``stop_slack`` huge) and every candidate fine-tuned in full records its
curve at three stages (1/6, 1/3, 1/2): its constraint value on the 64 stage samples at each stage and
at the end, and its final constraint value on the whole search part (the sequential test's).
Rows: benchmarks/results/stage_curves_<task>.jsonl.

``analyze``: replays each run in trial order. Each candidate is predicted from the curves of the
candidates fine-tuned before it (at least three), as ``stages.feasible_probability`` would, and with
other predictors; a prediction is the probability that the candidate ends feasible. Reported per
stage and predictor: Brier score, log loss, *false stops* (ended feasible, predicted below 0.5) and
*false promotions* (ended infeasible, predicted at least 0.5), and the standardized errors' mean and
spread (a calibrated predictor has about 0 and 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAX_DROP = {"digits": 0.005, "mnist1d": 0.02}  # cheap_eval.py's constraints


def collect(args) -> None:
    import optuna

    sys.path.insert(0, str(Path(__file__).parent))
    import cheap_eval

    import tightfit
    from tightfit.evaluation.stages import CURVE_ATTR
    from tightfit.pipeline import compress
    from tightfit.search.loop import trial_constraints

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    split, model, recipe = cheap_eval.setup(args.task, args.finetune_epochs)
    out = RESULTS / f"stage_curves_{args.task}.jsonl"
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{os.path.join(tmp, 'study.db')}"
            result = compress(
                copy.deepcopy(model),
                evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
                budget=30,
                search="auto",
                seed=seed,
                example_input=split.x_val[:1],
                storage=url,
                evaluation=tightfit.Sequential(
                    stages=(1 / 6, 1 / 3, 1 / 2), promote_probability=0.0, stop_slack=1e6, max_curves=100
                ),
                **recipe,
            )
            study = optuna.load_study(study_name="tightfit", storage=url)
            with open(out, "a") as handle:
                for t in study.trials:
                    attrs = t.user_attrs
                    handle.write(
                        json.dumps(
                            {
                                "seed": seed,
                                "number": t.number,
                                "fidelity": attrs.get("fidelity"),
                                "constraints": trial_constraints(t) if t.state.name == "COMPLETE" else None,
                                "curve": attrs.get(CURVE_ATTR),
                                "evals": attrs.get("evaluations"),
                            }
                        )
                        + "\n"
                    )
        print(seed, f"{result.compression_ratio:.2f}x", flush=True)


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def _mean_spread(gains: list[float]) -> tuple[float, float]:
    """Mean and predictive spread of a new gain, as ``stages._new_gain``."""
    k = len(gains)
    mean = sum(gains) / k
    var = sum((g - mean) ** 2 for g in gains) / (k - 1) if k > 1 else 0.0
    return mean, math.sqrt(var * (1 + 1 / k))


def predictions(
    prev: list[dict], value: float, se: float, stage: int, max_drop: float
) -> dict[str, tuple[float, float]]:
    """(central prediction, spread) of the final constraint value by each predictor."""
    if len(prev) < 3:
        return {}
    gains = [c["stages"][stage][0] - c["final"][0] for c in prev]
    out = {}
    mean, spread = _mean_spread(gains)
    out["mean gain (tightfit)"] = (value - mean, math.hypot(se, spread))
    mean, spread = _mean_spread(gains[-5:])
    out["mean gain, last 5"] = (value - mean, math.hypot(se, spread))
    for k in (3, 5):  # the k curves whose stage value is nearest: a gain that depends on the damage
        near = sorted(prev, key=lambda c: abs(c["stages"][stage][0] - value))[:k]
        g = [c["stages"][stage][0] - c["final"][0] for c in near]
        mean, spread = _mean_spread(g)
        noise = statistics.mean(c["gain_se"][stage][0] for c in near)
        out[f"nearest {k}"] = (value - mean, math.hypot(se, max(spread, noise * math.sqrt(1 + 1 / k))))
    # final drop proportional to the stage drop (a line through the origin in drop = value + max_drop)
    s = [c["stages"][stage][0] + max_drop for c in prev]
    f = [c["final"][0] + max_drop for c in prev]
    den = sum(x * x for x in s)
    if den > 0:
        rho = min(max(sum(x * y for x, y in zip(s, f)) / den, 0.0), 1.5)
        res = [y - rho * x for x, y in zip(s, f)]
        sd = math.sqrt(sum(e * e for e in res) / max(1, len(res) - 1) * (1 + 1 / len(res)))
        out["proportional drop"] = (rho * (value + max_drop) - max_drop, math.hypot(rho * se, sd))
    return out


def analyze(args) -> None:
    rows = [
        json.loads(line)
        for line in (RESULTS / f"stage_curves_{args.task}.jsonl").read_text().splitlines()
        if line.strip()
    ]
    runs = defaultdict(list)
    for r in rows:
        runs[r["seed"]].append(r)
    stats: dict[tuple[int, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    fractions = None
    for trials in runs.values():
        prev: list[dict] = []
        for t in sorted(trials, key=lambda r: r["number"]):
            curve = t["curve"]
            if not curve or t["fidelity"] != "full" or not t["constraints"]:
                continue
            feasible = t["constraints"][0] <= 0
            looks = [e for e in t["evals"] if e.get("level") == "stage"]
            fractions = fractions or [round(e["fraction"], 3) for e in looks]
            for stage in range(len(curve["stages"])):
                value, se = curve["stages"][stage][0], looks[stage]["se"][0]
                for name, (mu, sd) in predictions(prev, value, se, stage, MAX_DROP[args.task]).items():
                    p = _phi(-mu / sd) if sd > 0 else float(mu <= 0)
                    s = stats[(stage, name)]
                    s["brier"].append((p - feasible) ** 2)
                    s["logloss"].append(-math.log(max(1e-6, p if feasible else 1 - p)))
                    s["false_stop"].append(feasible and p < 0.5)
                    s["false_promotion"].append((not feasible) and p >= 0.5)
                    s["z"].append((t["constraints"][0] - mu) / sd if sd > 0 else 0.0)
                    s["feasible"].append(feasible)
            prev.append(curve)
    print(f"{args.task}: {len(runs)} runs; candidates fine-tuned in full, predicted from >= 3 earlier curves\n")
    print(
        "| stage | predictor | candidates (feasible) | Brier | log loss | false stops | false promotions | z mean | z sd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (stage, name), s in sorted(stats.items()):
        frac = fractions[stage] if fractions else stage
        print(
            f"| {frac} | {name} | {len(s['feasible'])} ({sum(s['feasible'])}) | {statistics.mean(s['brier']):.3f} | "
            f"{statistics.mean(s['logloss']):.3f} | {sum(s['false_stop'])} | {sum(s['false_promotion'])} | "
            f"{statistics.mean(s['z']):+.2f} | {statistics.pstdev(s['z']):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    c.add_argument("--finetune-epochs", type=int, default=None)
    a = sub.add_parser("analyze")
    a.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    args = parser.parse_args()
    {"collect": collect, "analyze": analyze}[args.command](args)


if __name__ == "__main__":
    main()
