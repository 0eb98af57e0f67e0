"""``bo``'s GP fits and acquisition optimization, replayed on the trials of a real search.

    PYTHONPATH=src nice -n 10 python benchmarks/bo_replay.py --task digits --seed 0
    PYTHONPATH=src python benchmarks/bo_replay.py --task digits --seed 0 --study S.db --step-time --tag T

Runs one search (``search="auto"`` = ``bo`` at budget 30, full evaluation, the cheap_eval task's
recipe), then at every BO step of it, on the trials that step saw:

- fits: a cold fit (prior hyperparameters, ``COLD_MAXITER`` L-BFGS iterations) and a warm fit (the
  previous step's stored hyperparameters, ``--warm-iters``) of both GPs: marginal log likelihood per
  observation and seconds;
- acquisition: ``optimize_acqf`` with each ``--acq`` setting (``restarts/raw_samples/maxiter``) and
  with a heavy reference (20/1024/200): the log acquisition value reached and seconds; and, at
  ``bo``'s own setting, BoTorch's ``LogConstrainedExpectedImprovement`` against ``bo``'s
  independent-posterior version of it (seconds, largest difference in value and candidate).

With ``--step-time``, only times whole BO steps (``_bo_step``) on the stored search ``--study``
(made with the code imported if the file is missing), so two versions of the code can be timed
on the same trials; one JSON line to benchmarks/results/bo_step_time.jsonl.

Prints a summary and appends one JSON line to benchmarks/results/bo_replay.jsonl. Timings are CPU
work on a shared machine: compare them within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cheap_eval  # noqa: E402

import tightfit  # noqa: E402
from tightfit.measure.analysis import analyze  # noqa: E402
from tightfit.pipeline import compress  # noqa: E402
from tightfit.search import gp as G  # noqa: E402
from tightfit.search.base import History, collect_history  # noqa: E402
from tightfit.search.bo import GP_ATTR, BOSampler  # noqa: E402
from tightfit.search.context import SearchContext  # noqa: E402
from tightfit.search.space import build_space  # noqa: E402

OUT = Path(__file__).parent / "results" / "bo_replay.jsonl"
REFERENCE = (20, 1024, 200)


def history_before(study: optuna.Study, trial, enc) -> History:
    """The completed trials the sampler saw when it made ``trial``'s suggestion (sequential run)."""
    h = collect_history(study, trial, enc)
    n = sum(
        1
        for u in study.get_trials(deepcopy=False)
        if u.number < trial.number and u.state == optuna.trial.TrialState.COMPLETE
    )
    return History(h.x[:n], h.objective[:n], h.violation[:n], h.se[:n], h.pending[:0], h.failed[:0])


def space_of(model, recipe):
    return build_space(recipe["strategy"], analyze(model))


def step_times(study: optuna.Study, space, args) -> dict:
    """CPU seconds of each BO step (``BOSampler._bo_step``: both fits and the acquisition), replayed
    on the stored trials with the code imported; the first pass warms up imports, the second is
    timed. Run it under the timing lock."""
    from tightfit.search.gp import one_thread

    study._storage.set_trial_system_attr = lambda *a, **k: None
    trials = study.get_trials()
    steps = [t for t in trials if GP_ATTR in t.system_attrs]
    times: list[float] = []
    for timed in (False, True):
        for t in steps:
            sampler = BOSampler(SearchContext(space=space, budget=30, seed=args.seed))
            sampler._trial = t
            h = history_before(study, t, sampler.encoding)
            started = time.process_time()
            with one_thread():
                sampler._bo_step(h, study)
            if timed:
                times.append(time.process_time() - started)
    row = {
        "task": args.task,
        "seed": args.seed,
        "study": args.study,
        "tag": args.tag,
        "bo_steps": len(times),
        "step_cpu_s_mean": statistics.mean(times),
        "step_cpu_s_median": statistics.median(times),
        "step_cpu_s_total": sum(times),
    }
    with open(OUT.with_name("bo_step_time.jsonl"), "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits", choices=["digits", "mnist1d"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-iters", type=int, default=G.WARM_MAXITER)
    ap.add_argument(
        "--acq", default="6/256/60,6/256/30,4/128/30,2/64/20", help="restarts/raw_samples/maxiter, comma-separated"
    )
    ap.add_argument("--study", help="SQLite file: replay the search stored there (made and stored if missing)")
    ap.add_argument("--step-time", action="store_true", help="only time whole BO steps (bo_step_time.jsonl)")
    ap.add_argument("--tag", default="", help="a label stored with the row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = [tuple(int(v) for v in s.split("/")) for s in args.acq.split(",")]

    split, model, recipe = cheap_eval.setup(args.task, 3 if args.task == "mnist1d" else None)
    storage = optuna.storages.InMemoryStorage()
    if args.study and Path(args.study).exists():  # replay a search stored earlier (e.g. by another version)
        optuna.copy_study(from_study_name="replay", from_storage=f"sqlite:///{args.study}", to_storage=storage)
    else:
        compress(
            model,
            evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
            budget=30,
            search="auto",
            seed=args.seed,
            example_input=split.x_val[:1],
            storage=storage,
            study_name="replay",
            **recipe,
        )
        if args.study:
            optuna.copy_study(from_study_name="replay", from_storage=storage, to_storage=f"sqlite:///{args.study}")
    study = optuna.load_study(storage=storage, study_name="replay")
    if args.step_time:
        print(json.dumps(step_times(study, space_of(model, recipe), args)))
        return
    space = space_of(model, recipe)
    trials = study.get_trials()
    storage.set_trial_system_attr = lambda *a, **k: None  # the replay must not overwrite the stored fits

    import botorch.optim

    optimize = botorch.optim.optimize_acqf
    acq_rows: list[dict] = []

    def compare_settings(acq, **kw):  # stands in for optimize_acqf inside BOSampler._bo_step
        row = {}
        for s in [REFERENCE, *settings]:
            torch.manual_seed(0)
            started = time.process_time()
            cand, value = optimize(
                acq, **{**kw, "num_restarts": s[0], "raw_samples": s[1], "options": {**kw["options"], "maxiter": s[2]}}
            )
            row["{}/{}/{}".format(*s)] = (float(value), time.process_time() - started)
        if type(acq).__name__ == "IndependentLogCEI":  # bo's acquisition vs BoTorch's own class
            from botorch.acquisition.analytic import LogConstrainedExpectedImprovement

            own = kw["num_restarts"], kw["raw_samples"], kw["options"]["maxiter"]
            for name, a in (
                ("independent", acq),
                (
                    "botorch",
                    LogConstrainedExpectedImprovement(
                        acq.model, best_f=acq.best_f, objective_index=0, constraints={1: (None, 0.0)}
                    ),
                ),
            ):
                torch.manual_seed(0)
                started = time.process_time()
                c, v = optimize(a, **kw)
                row[name] = (float(v), time.process_time() - started, c.detach().numpy().ravel().tolist())
            row["own_setting"] = "{}/{}/{}".format(*own)
        acq_rows.append(row)
        return cand, value

    fit_rows = []
    for t in trials:
        if GP_ATTR not in t.system_attrs:
            continue
        earlier = [u for u in trials if u.number < t.number and GP_ATTR in u.system_attrs]
        sampler = BOSampler(SearchContext(space=space, budget=30, seed=0))
        h = history_before(study, t, sampler.encoding)
        if earlier:
            init = earlier[-1].system_attrs[GP_ATTR]
            y_obj = -np.log(np.maximum(h.objective, 1e-12))
            se = h.se if not np.isnan(h.se).any() else None
            row = {"trial": t.number, "n": h.n}
            for name, y, s in (("objective", y_obj, None), ("constraint", h.violation, se)):
                for mode, kw in (("cold", {}), ("warm", {"init": init[name], "maxiter": args.warm_iters})):
                    torch.manual_seed(0)
                    started = time.process_time()
                    fitted = G.fit_gp(h.x, y, s, **kw)
                    row[f"{name}_{mode}"] = (G.marginal_log_likelihood(fitted), time.process_time() - started)
            fit_rows.append(row)
        sampler._trial = t
        botorch.optim.optimize_acqf = compare_settings
        try:
            sampler._bo_step(h, study)
        finally:
            botorch.optim.optimize_acqf = optimize

    summary: dict = {
        "tag": args.tag,
        "task": args.task,
        "seed": args.seed,
        "bo_steps": len(acq_rows),
        "warm_iters": args.warm_iters,
        "fits": {},
        "acquisition": {},
    }
    for name in ("objective", "constraint"):
        diff = np.array([r[f"{name}_warm"][0] - r[f"{name}_cold"][0] for r in fit_rows])
        summary["fits"][name] = {
            "steps": len(diff),
            "mll_warm_minus_cold_median": float(np.median(diff)),
            "mll_warm_minus_cold_min": float(diff.min()),
            "warm_worse_by_0.01": int((diff < -0.01).sum()),
            "cold_cpu_s_mean": statistics.mean(r[f"{name}_cold"][1] for r in fit_rows),
            "warm_cpu_s_mean": statistics.mean(r[f"{name}_warm"][1] for r in fit_rows),
        }
    ref = "{}/{}/{}".format(*REFERENCE)
    for s in [REFERENCE, *settings]:
        key = "{}/{}/{}".format(*s)
        gap = np.array([r[ref][0] - r[key][0] for r in acq_rows])
        summary["acquisition"][key] = {
            "gap_to_reference_median": float(np.median(gap)),
            "gap_to_reference_max": float(gap.max()),
            "cpu_s_mean": statistics.mean(r[key][1] for r in acq_rows),
        }
    same = [r for r in acq_rows if "independent" in r]
    if same:
        summary["acquisition_class"] = {
            "setting": same[0]["own_setting"],
            "botorch_cpu_s_mean": statistics.mean(r["botorch"][1] for r in same),
            "independent_cpu_s_mean": statistics.mean(r["independent"][1] for r in same),
            "max_abs_value_difference": max(abs(r["botorch"][0] - r["independent"][0]) for r in same),
            "max_abs_candidate_difference": max(
                float(np.abs(np.subtract(r["botorch"][2], r["independent"][2])).max()) for r in same
            ),
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as handle:
        handle.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
