"""Method comparison without training in the loop (issue 18): one task, one strategy, one constraint,
a fixed budget, several search methods and seeds.

    PYTHONPATH=src:. nice -n 19 python benchmarks/method_comparison.py --arms tpe,random,cmaes --seeds 0,1,2
    PYTHONPATH=src:. nice -n 19 python benchmarks/method_comparison.py --arms global_bisect,auto,auto+seq --seeds 0
    PYTHONPATH=src:. python benchmarks/method_comparison.py --report      # markdown table of the results

Recipe: ``Compose([Prune(), Quantize(bits=(2, 8))])`` under ``MaxDrop(0.005)``, objective the
saved file's bytes, ``finetune=None``, budget 30. Arms:

- any ``search=`` name of tightfit (``auto``, ``tpe``, ``random``, ``cmaes``, ``levelset``, ...):
  one ``compress`` call. ``levelset`` is tightfit's uniform bisection: one knob sets the same
  sparsity in every layer, every layer at 8 bits (the gentle end of the bit choices).
- ``NAME+seq``: the same with ``evaluation=tightfit.Sequential()`` (cheap evaluation).
- ``NAME+seqfP`` (e.g. ``auto+seqf0.25``): the same with ``Sequential(futility=P)`` (``Sequential()``
  has ``futility=0.1`` since 10ef58d; ``+seqf0`` is the test without futility stops).
- ``NAME+seqcN`` (e.g. ``auto+seqc1024``): the same with ``Sequential(trial_samples=N)`` (each
  trial reads at most N validation images; the credible capped ones are verified after the search);
  ``+seqcnone`` reads every trial to a decision.
- ``ARM@N`` (e.g. ``auto@100``, ``auto+seq@100``): the same at budget N instead of 30.
- ``global_bisect``: bisection over one global magnitude threshold across all layers (each
  layer's sparsity is the share of its weights at or below the threshold, at most Prune()'s 0.99),
  every layer at 8 bits, 11 steps over global sparsity [0, 0.99] (interval below 0.001). Without
  training it is deterministic: the seed does not change it.

Each finished run is added to the results JSON at once (file lock, atomic replace), so a finished
run is never lost; an (arm, seed, label) already there is skipped. Arms in one process run
interleaved seed by seed, so their wall times compare under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 shared cores: one thread was 6.7x faster than two under load
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tightfit  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402
from tightfit.export.artifact import to_bytes  # noqa: E402
from tightfit.measure.analysis import count_nonzeros  # noqa: E402
from tightfit.operators import Compose, Prune, Quantize  # noqa: E402
from tightfit.operators.plan import Plan, apply_plan_inplace  # noqa: E402
from tightfit.pipeline import compress, float32_file_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_DROP, BUDGET, BISECT_STEPS, BITS = 0.005, 30, 11, (2, 8)
RECIPE = "Compose([Prune(), Quantize(bits=(2, 8))]), MaxDrop(0.005), objective size, finetune=None"


def strategy() -> Compose:
    return Compose([Prune(), Quantize(bits=BITS)])


def commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip()


def layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


class Base:
    """The task and the original's figures, computed once per process."""

    def __init__(self, task_name: str) -> None:
        self.task = load_task(task_name)
        self.model = self.task.model()
        self.layers = layers(self.model)
        self.val = float(self.task.metric(self.model))
        self.test = float(self.task.test_metric(self.model))
        self.bytes = float32_file_bytes(self.model)
        self.params = count_nonzeros(self.model, self.layers)[1]
        self.val_n = len(self.task.val.dataset)


def describe(base: Base, model, data: bytes | None) -> dict:
    if model is None:
        return dict(feasible=False, file_bytes=None, compression=None, nonzeros=None, test_acc=None)
    nz = count_nonzeros(model, base.layers)[0]
    test = float(base.task.test_metric(model))
    return dict(
        feasible=True,
        file_bytes=len(data),
        compression=base.bytes / len(data),
        nonzeros=nz,
        nonzero_ratio=base.params / max(1, nz),
        test_acc=test,
        test_drop_points=100 * (base.test - test),
    )


def run_compress(
    base: Base,
    method: str,
    seed: int,
    sequential: tightfit.Sequential | None,
    budget: int = BUDGET,
    run_dir: Path | None = None,
) -> dict:
    started = time.perf_counter()
    result = compress(
        base.model,
        evaluate=base.task.metric,
        strategy=strategy(),
        constraint=tightfit.MaxDrop(MAX_DROP),
        finetune=None,
        budget=budget,
        search=method,
        seed=seed,
        example_input=base.task.example_input,
        evaluation=sequential,
        run_dir=run_dir,
    )
    wall = time.perf_counter() - started
    acc = result.accounting
    row = describe(base, result.model if result.feasible else None, result.artifact if result.feasible else None)
    plan = result.plan.to_dict()["layers"] if result.feasible and result.plan else None
    row.update(
        val_acc=result.metric if result.feasible else None,
        evaluations=len(result.trials),
        feasible_evaluations=sum(bool(t.feasible) for t in result.trials),
        val_forward_passes=acc.get("val_samples"),
        val_passes_probes=acc.get("val_samples_probes"),
        trials_by_fidelity=acc.get("trials_by_fidelity"),
        accounting=acc,  # the whole cost record: passes by kind, optimizer/probe seconds, time breakdown
        wall_s=wall,
        time=acc.get("time"),  # the run's own breakdown (probes, optimizer, evaluation, before/after)
        best_trial=result.best_trial.number if result.best_trial else None,
        certificate=result.certificate.to_dict() if result.certificate else None,
        plan=plan,
        trials=[
            dict(
                number=t.number,
                state=t.state,
                fidelity=t.fidelity,
                feasible=t.feasible,
                objective=t.objective,
                constraints=list(t.constraints),
                val_samples=t.val_samples,
                probe_samples=t.probe_samples,
                duration_s=t.duration_s,
                probe_s=t.probe_s,
                search_time_s=t.search_time_s,
                **plan_summary(t.plan),
            )
            for t in result.trials
        ],
    )
    return row


def plan_summary(plan: Plan | None) -> dict:
    """How many layers a trial put at 2 bits and its mean layer sparsity (what broke a plan)."""
    if plan is None:
        return {}
    layers = plan.to_dict()["layers"].values()
    bits = [v.get("quantize", {}).get("bits") for v in layers]
    spars = [v.get("prune", {}).get("sparsity", 0.0) for v in layers]
    return dict(layers_2bit=sum(b == 2 for b in bits), mean_sparsity=sum(spars) / max(1, len(spars)))


def diagnose(base: Base) -> dict:
    """Each layer alone at 2 bits (the rest at 8 bits, nothing pruned), and all at 8 bits: the
    validation drop in points, to tell which plans a random draw can hope to be feasible."""

    def drop(bits: dict[str, int]) -> float:
        plan = Plan.from_strategy(
            strategy(), {n: {"prune": {"sparsity": 0.0}, "quantize": {"bits": b}} for n, b in bits.items()}
        )
        model = apply_plan_inplace(plan, copy.deepcopy(base.model), strategy())
        return 100 * (base.val - float(base.task.metric(model)))

    eight = {n: 8 for n in base.layers}
    out = {"all_8bit": drop(eight)}
    for name in base.layers:
        out[f"{name}@2bit"] = drop({**eight, name: 2})
        print(name, out[f"{name}@2bit"], flush=True)
    return out


def global_plan(base: Base, s: float) -> Plan:
    mods = dict(base.model.named_modules())
    weights = {n: mods[n].weight.detach().abs() for n in base.layers}
    mags = torch.cat([w.flatten() for w in weights.values()])
    k = int(round(s * mags.numel()))
    high = Prune().sparsity[1]
    if k <= 0:
        spars = {n: 0.0 for n in base.layers}
    else:
        thr = torch.kthvalue(mags, k).values
        spars = {n: min(high, float((w <= thr).float().mean())) for n, w in weights.items()}
    return Plan.from_strategy(
        strategy(), {n: {"prune": {"sparsity": s_l}, "quantize": {"bits": max(BITS)}} for n, s_l in spars.items()}
    )


def run_global_bisect(base: Base, seed: int) -> dict:
    del seed  # deterministic without training
    started = time.perf_counter()
    lo, hi, best, evals, feasible, passes = 0.0, Prune().sparsity[1], None, 0, 0, base.val_n
    for _ in range(BISECT_STEPS):
        s = (lo + hi) / 2
        plan = global_plan(base, s)
        model = apply_plan_inplace(plan, copy.deepcopy(base.model), strategy())
        val = float(base.task.metric(model))
        evals, passes = evals + 1, passes + base.val_n
        if base.val - val <= MAX_DROP + 1e-12:
            feasible, lo, best = feasible + 1, s, (model, plan, val, s)
        else:
            hi = s
    data = to_bytes(best[0], best[1]) if best else None
    wall = time.perf_counter() - started
    row = describe(base, best[0] if best else None, data)
    row.update(
        val_acc=best[2] if best else None,
        global_sparsity=best[3] if best else None,
        evaluations=evals,
        feasible_evaluations=feasible,
        val_forward_passes=passes,
        wall_s=wall,
        plan=best[1].to_dict()["layers"] if best else None,
    )
    return row


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"recipe": RECIPE, "runs": []}


def append(path: Path, row: dict) -> None:
    with locked(path):
        data = read(path)
        data["runs"].append(row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def run_one(base: Base, arm: str, seed: int, keep: Path | None = None) -> dict:
    if arm == "global_bisect":
        return run_global_bisect(base, seed)
    name, _, budget = arm.partition("@")
    method, _, mode = name.partition("+")
    run_dir = keep / f"{base.task.name}_{arm}_s{seed}" if keep else None
    sequential = None
    if mode.startswith("seqf"):
        sequential = tightfit.Sequential(futility=float(mode[4:]))
    elif mode.startswith("seqc"):
        cap = mode[4:]
        sequential = tightfit.Sequential(trial_samples=int(cap) if cap != "none" else None)
    elif mode == "seq":
        sequential = tightfit.Sequential()
    elif mode:
        raise SystemExit(f"unknown arm mode {mode!r} in {arm!r}: seq, seqfP or seqcN")
    return run_compress(base, method, seed, sequential=sequential, budget=int(budget or BUDGET), run_dir=run_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="fmnist-resnet")
    ap.add_argument("--arms", default="tpe,levelset,global_bisect,random,cmaes,auto,auto+seq")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--label", default="", help="a name for the code variant (e.g. the branch), stored per run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="each layer alone at 2 bits: its validation drop")
    ap.add_argument("--passes", default=None, help="ARM: where each run's validation images went (with --split)")
    ap.add_argument("--split", type=int, default=13, help="--passes: trials before this number vs from it on")
    ap.add_argument("--cost", default=None, help="ARM: wall time / (budget x one trial's evaluation time)")
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's run_dir (study, trials) under this folder")
    ap.add_argument(
        "--versus-full",
        default=None,
        metavar="LABEL:FULL_LABELS",
        help="table of LABEL's +seq arms against full evaluation's auto rows of FULL_LABELS (comma-separated)",
    )
    args = ap.parse_args()
    out = Path(args.out or ROOT / "docs" / "results" / f"method_comparison_{args.task}.json")
    if args.report:
        report(read(out)["runs"])
        return
    if args.passes:
        passes(read(out)["runs"], args.passes, args.split)
        return
    if args.cost:
        cost(read(out)["runs"], args.cost)
        return
    if args.versus_full:
        label, _, full_labels = args.versus_full.partition(":")
        versus_full(read(out)["runs"], full_labels.split(","), label)
        return
    if args.diagnose:
        row = dict(task=args.task, arm="diagnose_2bit", seed=None, commit=commit(), label=args.label)
        started = time.perf_counter()
        row.update(drops_points=diagnose(Base(args.task)), wall_s=time.perf_counter() - started)
        append(out, row)
        return
    here = commit()
    base = Base(args.task)
    print(f"original: val {base.val:.4f} test {base.test:.4f} bytes {base.bytes}", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            with locked(out):  # re-read: another process may have run it meanwhile
                done = {
                    (r["arm"], r["seed"], r["label"])
                    for r in read(out)["runs"]
                    if "error" not in r and r["arm"] != "diagnose_2bit"
                }
            if (arm, seed, args.label) in done:
                continue
            load = os.getloadavg()[0]
            budget = int(arm.partition("@")[2] or BUDGET)
            row = dict(task=args.task, arm=arm, seed=seed, budget=budget, commit=here, label=args.label)
            row.update(base_val_acc=base.val, base_test_acc=base.test, base_bytes=base.bytes, load_before=load)
            try:
                row.update(run_one(base, arm, seed, args.keep))
            except Exception as exc:  # recorded; the other runs go on
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["load_after"] = os.getloadavg()[0]
            append(out, row)
            keys = ("arm", "seed", "feasible", "compression", "test_drop_points", "evaluations", "wall_s", "error")
            print(json.dumps({k: row.get(k) for k in keys}), flush=True)


def _outcomes(rows: list[dict]) -> tuple[list[float], list[float], float]:
    """Per run: the compression (1.0 where no feasible plan was found), the test drops of the
    feasible answers, and the compression's standard deviation."""
    comp = [r["compression"] if r["feasible"] else 1.0 for r in rows]
    drops = [r["test_drop_points"] for r in rows if r["feasible"]]
    return comp, drops, statistics.stdev(comp) if len(comp) > 1 else 0.0


def report(runs: list[dict]) -> None:
    print(
        "| arm | commit | seeds | feasible | compression median (mean ± sd) | test drop, points (mean) | "
        "evaluations | val forward passes (median) | wall s (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "error" not in r and r["arm"] != "diagnose_2bit":
            groups.setdefault((r["arm"], f"{r['label']} {r['commit']}"), []).append(r)
    for (arm, sha), rows in groups.items():
        comp, drops, sd = _outcomes(rows)
        passes = [r["val_forward_passes"] for r in rows if r.get("val_forward_passes") is not None]
        drop = f"{statistics.mean(drops):.2f}" if drops else "–"
        print(
            f"| {arm} | {sha} | {','.join(str(r['seed']) for r in rows)} | {sum(r['feasible'] for r in rows)}/{len(rows)} "
            f"| {statistics.median(comp):.2f}x ({statistics.mean(comp):.2f} ± {sd:.2f}) | {drop} "
            f"| {statistics.median(r['evaluations'] for r in rows):.0f} "
            f"| {statistics.median(passes) if passes else float('nan'):,.0f} "
            f"| {statistics.median(r['wall_s'] for r in rows):.0f} |"
        )


def versus_full(runs: list[dict], full_labels: list[str], label: str) -> None:
    """Cheap-evaluation arms of ``label`` against full evaluation (``auto`` rows of ``full_labels``):
    compression, test drop, and validation images and wall time as shares of full evaluation's."""
    ok = [r for r in runs if "error" not in r]
    full = [r for r in ok if r["arm"] == "auto" and r["label"] in full_labels]
    if not full:
        raise SystemExit(f"no `auto` rows with labels {full_labels}")
    full_images = statistics.median(r["val_forward_passes"] for r in full)
    full_wall = statistics.median(r["wall_s"] for r in full)
    print(
        "| arm | seeds | compression median (mean ± sd; per seed) | test drop, points: mean (max) | "
        "val images median (of full) | wall s median (of full) |"
    )
    print("|---|---|---|---|---|---|")
    arms = sorted({r["arm"] for r in ok if r["label"] == label and "+seq" in r["arm"]})
    for arm, rows in [("auto (full evaluation)", full)] + [
        (a, [r for r in ok if r["arm"] == a and r["label"] == label]) for a in arms
    ]:
        rows = sorted(rows, key=lambda r: r["seed"])
        comp, drops, sd = _outcomes(rows)
        images = statistics.median(r["val_forward_passes"] for r in rows)
        wall = statistics.median(r["wall_s"] for r in rows)
        drop = f"{statistics.mean(drops):.2f} (max {max(drops):.2f})" if drops else "no answer"
        print(
            f"| {arm} | {','.join(str(r['seed']) for r in rows)} | {statistics.median(comp):.2f}x "
            f"({statistics.mean(comp):.2f} ± {sd:.2f}; {', '.join(f'{c:.2f}' for c in comp)}) | "
            f"{drop} | {images:,.0f} ({100 * images / full_images:.0f}%) | "
            f"{wall:.0f} ({100 * wall / full_wall:.0f}%) |"
        )


def passes(runs: list[dict], arm: str, split: int) -> None:
    """Validation images per run of ``arm``: the probes, the trials before ``split`` (bo's floor
    phases at budget 30: 5 uniform + 8 global trials), the trials from it on, and the rest (the
    original's and the answer's full passes)."""
    print(
        f"| label | seed | total | probes | trials < {split} | trials >= {split} (screened) | rest "
        f"| trials >= {split} measured in full: infeasible / all, median images |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["arm"] != arm or "error" in r or not r.get("trials"):
            continue
        early = sum(t["val_samples"] or 0 for t in r["trials"] if t["number"] < split)
        late = [t for t in r["trials"] if t["number"] >= split]
        n_late = sum(t["val_samples"] or 0 for t in late)
        screened = sum(t["fidelity"] == "screen" for t in late)
        rest = r["val_forward_passes"] - (r["val_passes_probes"] or 0) - early - n_late
        full = [t for t in late if t["fidelity"] != "screen"]
        med = statistics.median(t["val_samples"] or 0 for t in full) if full else 0
        print(
            f"| {r['label']} | {r['seed']} | {r['val_forward_passes']:,} | {r['val_passes_probes'] or 0:,} "
            f"| {early:,} | {n_late:,} ({screened} of {len(late)}) | {rest:,} "
            f"| {sum(not t['feasible'] for t in full)} / {len(full)}, {med:,.0f} |"
        )


def cost(runs: list[dict], arm: str) -> None:
    """Issue 18's budget-bounds-cost line: a run's wall time (as ``compress`` counts it, probes
    included) over ``budget`` times one evaluation (a trial's median time less its optimizer's)."""
    print("| label | seed | budget | wall s | probes s | one evaluation s (median) | wall / (N x evaluation) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        if r["arm"] != arm or "error" in r or not r.get("time"):
            continue
        each = statistics.median(
            t["duration_s"] - (t["search_time_s"] or 0.0) for t in r["trials"] if t.get("duration_s") is not None
        )
        total = r["time"]["total_s"]
        print(
            f"| {r['label']} | {r['seed']} | {r['budget']} | {total:.0f} | {r['time']['probes_s']:.0f} "
            f"| {each:.1f} | {total / (r['budget'] * each):.2f} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
