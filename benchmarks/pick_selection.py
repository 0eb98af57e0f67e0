"""How much the final pick owes to the validation images it was made on (issue 18 item 5).

A search that measures many plans near the constraint's edge on the same validation images and keeps
the best-looking feasible one picks partly for luck: at budget 100 on fmnist-mobilenet ``auto``'s answer
lost 0.36 validation points and 0.91 test points against a 0.5 allowance. This script re-measures
every trial of a kept run (``method_comparison.py --keep DIR``) image by image on validation and test,
then replays pick rules over the same study to see which answer each would give and what it loses on
test (no search decision reads the test images; the pick does not change the search's trajectory, so
replaying it over the finished study is exact).

    PYTHONPATH=src:. python benchmarks/method_comparison.py --task fmnist-mobilenet --arms auto@100 --seeds 1 --keep K
    PYTHONPATH=src:. python benchmarks/pick_selection.py measure --task fmnist-mobilenet --run K/fmnist-mobilenet_auto@100_s1 --out F.json
    PYTHONPATH=src:. python benchmarks/pick_selection.py rules F.json [F2.json ...]

``measure`` stores the study's trials in its output, so ``rules`` needs only that file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from benchmarks.method_comparison import MAX_DROP, strategy  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from tightfit.operators.plan import Plan, apply_plan_inplace  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def correct(metric, model) -> np.ndarray:
    """Per-image correctness over the metric's loader, in its order (the task's ``Accuracy``)."""
    return metric.per_sample(model).numpy().astype(bool)


def violation(t: optuna.trial.FrozenTrial) -> float:
    return max(float(v) for v in t.constraints.values())


def bits(a: np.ndarray) -> str:
    return np.packbits(a.astype(np.uint8)).tobytes().hex()


def unbits(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(s), dtype=np.uint8))[:n].astype(bool)


def load_study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="tightfit", storage=f"sqlite:///{run / 'study.db'}")


def export_trials(study: optuna.Study) -> dict:
    """The study's trials as JSON, so the replay does not need the run directory: the distributions
    once (every trial of a run shares them), per trial what the pick reads (not the stored plan,
    which follows from the params, nor ``bo``'s cached GP hyperparameters)."""
    from optuna.distributions import distribution_to_json

    trials = study.get_trials()
    dists = {k: distribution_to_json(d) for t in trials for k, d in t.distributions.items()}
    rows = [
        dict(
            number=t.number,
            state=t.state.name,
            params=t.params,
            values=t.values,
            system_attrs={k: v for k, v in t.system_attrs.items() if k != "tightfit.bo.gp"},
            user_attrs={k: v for k, v in t.user_attrs.items() if k != "plan"},
        )
        for t in trials
    ]
    return dict(distributions=dists, trials=rows)


def import_trials(data: dict) -> optuna.Study:
    from optuna.distributions import json_to_distribution

    dists = {k: json_to_distribution(d) for k, d in data["distributions"].items()}
    study = optuna.create_study()
    for r in data["trials"]:
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState[r["state"]],
            params=r["params"],
            distributions={k: dists[k] for k in r["params"]},
            values=r["values"],
            system_attrs=r["system_attrs"],
            user_attrs=r["user_attrs"],
        )
        study.add_trial(trial)
    return study


def measure(task_name: str, run: Path, out: Path, window: float) -> None:
    """Each measured trial whose constraint value is at most ``window`` (accuracy, not points),
    rebuilt from its stored plan and read image by image on validation and test."""
    task = load_task(task_name)
    model = task.model()
    study = load_study(run)
    exported = export_trials(study)
    rows = [dict(number=-1, val=bits(correct(task.metric, model)), test=bits(correct(task.test_metric, model)))]
    trials = [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if t.constraints and violation(t) <= window and "plan" in t.user_attrs
    ]
    # the feasible ones first (the only ones a pick may return), then the rest from the edge outwards
    trials.sort(key=lambda t: max(0.0, violation(t)))
    print(f"{len(trials)} trials within {window} of the constraint", flush=True)
    for t in trials:
        started = time.perf_counter()
        m = apply_plan_inplace(Plan.from_dict(t.user_attrs["plan"]), copy.deepcopy(model), strategy())
        v, s = correct(task.metric, m), correct(task.test_metric, m)
        rows.append(dict(number=t.number, val=bits(v), test=bits(s)))
        stored = (t.user_attrs.get("measurement") or {}).get("metric")
        took = time.perf_counter() - started
        print(f"trial {t.number}: val {v.mean():.4f} (run: {stored}) test {s.mean():.4f} ({took:.0f} s)", flush=True)
        data = dict(task=task_name, run=str(run), n_val=len(v), n_test=len(s), rows=rows, study=exported)
        out.write_text(json.dumps(data) + "\n")


def prefix_study(study: optuna.Study, n: int) -> optuna.Study:
    """The study as it stood after its first ``n`` trials (what a run of budget ``n`` would pick from,
    up to the search's budget-dependent phases)."""
    sub = optuna.create_study(directions=study.directions)
    sub.add_trials([t for t in study.get_trials() if t.number < n])
    return sub


def replay(data: dict) -> None:
    """Each pick rule over the whole study and its prefixes: the answer, its validation and test drop."""
    from tightfit.measure.analysis import analyze
    from tightfit.pipeline import float32_file_bytes
    from tightfit.search import pick as picks
    from tightfit.search.space import build_space

    task = load_task(data["task"])
    model = task.model()
    space = build_space(strategy(), analyze(model))
    base_bytes = float32_file_bytes(model)
    study = import_trials(data["study"])
    per_image = {
        r["number"]: (unbits(r["val"], data["n_val"]), unbits(r["test"], data["n_test"])) for r in data["rows"]
    }
    base = per_image.pop(-1)
    print(f"{data['task']} {data['run']}: {len(study.trials)} trials, {len(per_image)} re-measured")
    model_at(study, space, per_image, base)
    for n in (30, 50, len(study.trials)):
        sub = prefix_study(study, n)
        for name, rule in RULES.items():
            number = rule(sub, space, picks)
            if number is None or number not in per_image:
                print(
                    f"  n={n:3d} {name:12s} "
                    + ("no trial qualifies" if number is None else f"trial {number} (not re-measured)")
                )
                continue
            vd, td = drops(base, per_image[number])
            size = f"{base_bytes / study.trials[number].values[0]:.2f}x"
            print(f"  n={n:3d} {name:12s} trial {number:3d} {size} val drop {vd:.2f} test drop {td:.2f}")


def drops(base: tuple[np.ndarray, np.ndarray], trial: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """A trial's validation and test drop in points against the original's per-image correctness."""
    return 100 * (base[0].mean() - trial[0].mean()), 100 * (base[1].mean() - trial[1].mean())


def model_at(study: optuna.Study, space, per_image: dict, base: tuple[np.ndarray, np.ndarray]) -> None:
    """The constraint model of the whole study at each re-measured trial against its drops (points)."""
    from tightfit.search.pick import ModelData

    md = ModelData.of(study, space)
    fitted = md.posterior()
    if fitted is None:
        print("  the constraint model could not be fitted")
        return
    limit = 100 * MAX_DROP
    print("  trial  objective  model mean  model sd  val drop  test drop  paired se (val)")
    gaps = []
    for t, m, sd in sorted(zip(md.done, *fitted), key=lambda z: z[0].values[0]):
        if t.number not in per_image:
            continue
        vd, td = drops(base, per_image[t.number])
        diff = base[0].astype(float) - per_image[t.number][0]
        se = 100 * diff.std(ddof=1) / np.sqrt(len(diff))
        gaps.append(td - vd)
        print(
            f"  {t.number:5d} {t.values[0]:10,.0f} {limit + 100 * m:10.2f} {100 * sd:9.2f} {vd:9.2f} {td:10.2f} {se:8.2f}"
        )
    g = np.array(gaps)
    print(f"  test drop - val drop over the {len(g)} re-measured trials: mean {g.mean():+.2f}, sd {g.std(ddof=1):.2f}")


def credible(q: float):
    """Smallest-objective observed-feasible trial whose model probability of feasibility is at least ``q``."""
    from statistics import NormalDist

    from tightfit.search.pick import ModelData

    def rule(study, space, picks) -> int | None:
        md = ModelData.of(study, space)
        fitted = md.posterior()
        if fitted is None:
            return None
        ok = [
            t
            for t, m, sd in zip(md.done, *fitted)
            if t in md.measured and violation(t) <= 0 and NormalDist().cdf(-m / max(sd, 1e-12)) >= q
        ]
        return min(ok, key=lambda t: (t.values[0], t.number)).number if ok else None

    return rule


def scaled_noise(factor: float):
    """The posterior pick with every trial's ``metric_se`` times ``factor``: a drop's standard error
    is that of a paired difference, which on these tasks is about half the accuracy's own (0.13-0.24
    against about 0.37 points on 5,000 images), so the pick's model treats the measurements as
    noisier than they are."""

    def rule(study, space, picks) -> int | None:
        trials = study.get_trials()  # copies
        for t in trials:
            if t.user_attrs.get("metric_se") is not None:
                t.user_attrs = {**t.user_attrs, "metric_se": factor * float(t.user_attrs["metric_se"])}
        scaled = optuna.create_study(directions=study.directions)
        scaled.add_trials(trials)
        return picks.posterior_pick(scaled, space).number

    return rule


RULES = {
    "observed": lambda st, sp, p: p.posterior_pick(st, sp, min_trials=10**9).number,
    "posterior": lambda st, sp, p: p.posterior_pick(st, sp).number,
    "p>=0.7": credible(0.7),
    "p>=0.8": credible(0.8),
    "p>=0.9": credible(0.9),
    "se x 0.5": scaled_noise(0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--task", required=True)
    m.add_argument("--run", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--window", type=float, default=0.006)
    r = sub.add_parser("rules")
    r.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args.task, args.run, args.out, args.window)
    else:
        for f in args.files:
            replay(json.loads(f.read_text()))


if __name__ == "__main__":
    main()
