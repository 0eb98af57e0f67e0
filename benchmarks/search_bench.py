"""Search benchmark of issue 3: every search method and three non-search baselines, at equal
training per evaluation (the recipe in search_tasks.py), several budgets and seeds.

    nice -n 10 python benchmarks/search_bench.py --tasks lenet300100 --budgets 30 --seeds 0-4 \
        --methods auto,bo,levelset,mads,olmp,cmaes,tpe,random,uniform_bisect,global_bisect,imp

One JSON line per (task, method, budget, seed) goes to benchmarks/results/search_runs.jsonl;
finished jobs are skipped when the command is run again. `search_report.py` makes the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_tasks import BATCH, FT_EPOCHS, FT_LR, MAX_DROP, accuracy, task  # noqa: E402

import tightfit  # noqa: E402
from tightfit.export.artifact import to_bytes  # noqa: E402
from tightfit.measure.analysis import count_nonzeros  # noqa: E402
from tightfit.operators import Prune  # noqa: E402
from tightfit.operators.plan import Plan, apply_plan_inplace  # noqa: E402
from tightfit.pipeline import compress, float32_file_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "search_runs.jsonl"
TRACES = Path(__file__).parent / "results" / "search_traces.jsonl"
TRACE = False  # --trace: every trial's test accuracy and a re-fine-tune with another seed (for the final-pick study)
SEARCH_METHODS = ("auto", "bo", "levelset", "mads", "olmp", "cmaes", "tpe", "random")
BASELINES = ("uniform_bisect", "global_bisect", "imp")


RECIPE = "finetune"  # --recipe: the recovery every method gets per evaluation (the same for all)
RECIPE_LR = FT_LR


def _finetune(split):
    loader = split.loader("train", BATCH, shuffle=True)
    if RECIPE == "gradual":  # tightfit's own recovery at the recipe's length
        return tightfit.GradualPrune(loader, epochs=FT_EPOCHS, lr=RECIPE_LR)
    return tightfit.FineTune(loader, epochs=FT_EPOCHS, lr=RECIPE_LR)


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


class TracedFineTune:
    """The recipe's fine-tune, plus (benchmark only, never seen by the search) each trial's test
    accuracy and the same plan fine-tuned with an independent seed: what a final-pick rule would
    see if it re-checked a trial, and what it would ship."""

    def __init__(self, split, seed: int) -> None:
        self.split, self.seed, self.rows = split, seed, []
        self.inner = _finetune(split)

    def __call__(self, model) -> None:
        before = copy.deepcopy(model)
        self.inner(model)
        s = self.split
        other = None
        with torch.random.fork_rng():
            torch.manual_seed(10_000 + self.seed)
            self.inner(before)
            other = before
        self.rows.append(
            dict(
                test=accuracy(model, s.x_test, s.y_test),
                val_bits=_bits(model, s.x_val, s.y_val),
                val2=accuracy(other, s.x_val, s.y_val),
                test2=accuracy(other, s.x_test, s.y_test),
            )
        )


def t_total(t) -> int:
    return count_nonzeros(t.model, _layers(t.model))[1]


def _bits(model, x, y) -> str:
    with torch.no_grad():
        return "".join("1" if c else "0" for c in (model(x).argmax(-1) == y).tolist())


def run_search(task_name: str, method: str, budget: int, seed: int) -> dict:
    t = task(task_name)
    split = t.split
    started = time.perf_counter()
    traced = TracedFineTune(split, seed) if TRACE else None
    result = compress(
        t.model,
        evaluate=tightfit.Accuracy(split.loader("val", 512)),
        strategy=Prune(sparsity=(0.0, 0.999)),
        constraint=tightfit.MaxDrop(MAX_DROP),
        objective="nonzeros",
        finetune=traced or _finetune(split),
        budget=budget,
        search=method,
        seed=seed,
    )
    wall = time.perf_counter() - started
    from tightfit.search.samplers import auto_method  # noqa: F401  (recorded below for "auto")

    times = [tr.search_time_s for tr in result.trials if getattr(tr, "search_time_s", None) is not None]
    row = _row(task_name, method, budget, seed, t, result.model if result.feasible else None, result.artifact, wall)
    row.update(
        evals=len(result.trials),
        feasible_evals=sum(tr.feasible for tr in result.trials),
        val_acc=result.metric if result.feasible else None,
        search_s_mean=statistics.mean(times) if times else None,
        search_s_max=max(times) if times else None,
        plan=result.plan.to_dict()["layers"] if result.plan else None,
    )
    from tightfit.pipeline import best_feasible

    observed = best_feasible(result.trials)  # the best *observed* feasible trial (the old final pick)
    row["observed_plan"] = observed.plan.to_dict()["layers"] if observed is not None else None
    if traced is not None:
        done = [tr for tr in result.trials if tr.state == "COMPLETE"]
        row["base_val_bits"] = _bits(t.model, split.x_val, split.y_val)
        row["trials"] = [
            dict(
                number=tr.number,
                objective=tr.objective,
                val=tr.measurement.metric,
                violation=max(tr.constraints),
                plan=[v["prune"]["sparsity"] for v in tr.plan.to_dict()["layers"].values()],
                **extra,
            )
            for tr, extra in zip(done, traced.rows)
        ]
        row["best_trial"] = result.best_trial.number if result.best_trial else None
        # what the old final pick (best observed feasible trial) would have returned, from the same run
        if observed is not None:
            trace = {tr["number"]: tr for tr in row["trials"]}[observed.number]
            row["observed_pick"] = dict(
                number=observed.number,
                cr_nonzeros=t_total(t) / observed.objective,
                test_acc=trace["test"],
                val_acc=trace["val"],
            )
    return row


def _row(task_name, method, budget, seed, t, model, artifact, wall) -> dict:
    layers = _layers(t.model)
    base_nz, total = count_nonzeros(t.model, layers)
    row = dict(
        task=task_name,
        method=method,
        budget=budget,
        seed=seed,
        wall_s=wall,
        base_test_acc=accuracy(t.model, t.split.x_test, t.split.y_test),
        base_val_acc=accuracy(t.model, t.split.x_val, t.split.y_val),
    )
    if model is None:
        row.update(feasible=False, cr_nonzeros=1.0, cr_bytes=1.0, test_acc=row["base_test_acc"])
        return row
    nz, _ = count_nonzeros(model, layers)
    row.update(
        feasible=True,
        cr_nonzeros=total / max(1, nz),
        cr_bytes=float32_file_bytes(t.model) / len(artifact),
        test_acc=accuracy(model, t.split.x_test, t.split.y_test),
    )
    return row


# --- the three non-search baselines, on the same evaluation recipe ---------------------------


def _evaluate_plan(t, plan: Plan, seed: int, base_model=None):
    model = apply_plan_inplace(
        plan, copy.deepcopy(base_model or t.model), tightfit.Compose([Prune(sparsity=(0.0, 0.999))])
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _finetune(t.split)(model)
    return model, accuracy(model, t.split.x_val, t.split.y_val)


def _plan(sparsities: dict[str, float]) -> Plan:
    return Plan.from_strategy(
        tightfit.Compose([Prune(sparsity=(0.0, 0.999))]),
        {n: {"prune": {"sparsity": float(s)}} for n, s in sparsities.items()},
    )


def _global_sparsities(model, layers, s: float) -> dict[str, float]:
    mods = dict(model.named_modules())
    mags = torch.cat([mods[n].weight.detach().abs().flatten() for n in layers])
    k = int(round(s * mags.numel()))
    if k <= 0:
        return {n: 0.0 for n in layers}
    thr = torch.kthvalue(mags, k).values
    return {n: float((mods[n].weight.detach().abs() <= thr).float().mean()) for n in layers}


def run_bisect(task_name: str, kind: str, seed: int, steps: int = 11) -> dict:
    t = task(task_name)
    layers = _layers(t.model)
    started = time.perf_counter()
    lo, hi, best, evals, feas = 0.0, 0.999, None, 0, 0
    for _ in range(steps):
        s = (lo + hi) / 2
        spars = {n: s for n in layers} if kind == "uniform_bisect" else _global_sparsities(t.model, layers, s)
        plan = _plan(spars)
        model, val = _evaluate_plan(t, plan, seed)
        evals += 1
        if row_feasible(t, val):
            feas += 1
            lo, best = s, (model, plan, val)
        else:
            hi = s
    wall = time.perf_counter() - started
    if best is None:
        row = _row(task_name, kind, steps, seed, t, None, None, wall)
    else:
        row = _row(task_name, kind, steps, seed, t, best[0], to_bytes(best[0], best[1]), wall)
        row["val_acc"] = best[2]
        row["plan"] = best[1].to_dict()["layers"]
    row.update(evals=evals, feasible_evals=feas)
    return row


def row_feasible(t, val: float) -> bool:
    return accuracy(t.model, t.split.x_val, t.split.y_val) - val <= MAX_DROP + 1e-12


def run_imp(task_name: str, seed: int, factor: float = 0.7, max_rounds: int = 30) -> dict:
    """Iterative global magnitude pruning with retraining: density x0.7 per round, each round the
    same 3-epoch fine-tune, continuing from the previous round's weights; the last round that
    still met the constraint is the answer. Total fine-tune epochs = 3 x rounds."""
    t = task(task_name)
    layers = _layers(t.model)
    started = time.perf_counter()
    current = copy.deepcopy(t.model)
    density, best, rounds, feas = 1.0, None, 0, 0
    for _ in range(max_rounds):
        density *= factor
        spars = _global_sparsities(current, layers, 1 - density)
        plan = _plan(spars)
        model, val = _evaluate_plan(t, plan, seed, base_model=current)
        rounds += 1
        if not row_feasible(t, val):
            break
        feas += 1
        best = (model, plan, val)
        current = _plain_copy(t.model, model)
    wall = time.perf_counter() - started
    if best is None:
        row = _row(task_name, "imp", rounds, seed, t, None, None, wall)
    else:
        row = _row(task_name, "imp", rounds, seed, t, best[0], to_bytes(best[0], best[1]), wall)
        row["val_acc"] = best[2]
    row.update(evals=rounds, feasible_evals=feas, finetune_epochs=FT_EPOCHS * rounds)
    return row


def _plain_copy(original, trained):
    """A copy of ``original`` holding ``trained``'s effective weights (masks baked in)."""
    out = copy.deepcopy(original)
    src = dict(trained.named_modules())
    with torch.no_grad():
        for name, module in out.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(getattr(src[name], pname).detach())
    return out


def run_job(job: tuple[str, str, int, int]) -> dict:
    torch.set_num_threads(1)
    task_name, method, budget, seed = job
    try:
        if method in ("uniform_bisect", "global_bisect"):
            row = run_bisect(task_name, method, seed)
        elif method == "imp":
            row = run_imp(task_name, seed)
        else:
            row = run_search(task_name, method, budget, seed)
        row["budget"] = budget
    except Exception as exc:  # a failing job is recorded, the grid goes on
        row = dict(task=task_name, method=method, budget=budget, seed=seed, error=f"{type(exc).__name__}: {exc}")
    return row


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["method"], r["budget"], r["seed"]) for r in rows if "error" not in r}


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="lenet300100")
    ap.add_argument("--methods", default=",".join(SEARCH_METHODS + BASELINES))
    ap.add_argument("--budgets", default="30")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trace", action="store_true", help="record every trial (to results/search_traces.jsonl)")
    ap.add_argument(
        "--out",
        default=None,
        help="results file (default: results/search_runs.jsonl, or search_traces.jsonl with --trace)",
    )
    ap.add_argument(
        "--recipe",
        choices=("finetune", "gradual"),
        default="finetune",
        help="per-evaluation recovery for every method: the baselines' masked fine-tune (default) "
        "or GradualPrune over the same 3 epochs; use a separate --out",
    )
    ap.add_argument(
        "--recipe-lr", type=float, default=FT_LR, help="the recipe's Adam learning rate (default: the baselines' 3e-4)"
    )
    args = ap.parse_args()
    global TRACE, RECIPE, RECIPE_LR
    TRACE, RECIPE, RECIPE_LR = args.trace, args.recipe, args.recipe_lr
    out = Path(args.out) if args.out else TRACES if TRACE else RESULTS
    jobs = []
    done = _done(out)
    for task_name in args.tasks.split(","):
        for method in args.methods.split(","):
            budgets = (
                [11]
                if method.endswith("bisect")
                else [0]
                if method == "imp"
                else [int(b) for b in args.budgets.split(",")]
            )
            for budget in budgets:
                for seed in _seeds(args.seeds):
                    if (task_name, method, budget, seed) not in done:
                        jobs.append((task_name, method, budget, seed))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} jobs", flush=True)
    torch.set_num_threads(1)
    for task_name in sorted({j[0] for j in jobs}):
        task(task_name)  # train once, before the workers fork
    with mp.get_context("fork").Pool(args.workers, maxtasksperchild=20) as pool:
        for row in pool.imap_unordered(run_job, jobs):
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps(
                    {
                        k: row.get(k)
                        for k in ("task", "method", "budget", "seed", "cr_nonzeros", "test_acc", "wall_s", "error")
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
