"""Benchmark of the recoveries of issue 7 (results go to docs/results/recovery_*.json).

    nice -n 10 python benchmarks/recovery.py prune   --model lenet300 --epochs 6
    nice -n 10 python benchmarks/recovery.py sparse  --model lenet300 --epochs 20
    nice -n 10 python benchmarks/recovery.py quant   --model lenet300 --epochs 6
    nice -n 10 python benchmarks/recovery.py tuned   --model lenet300 --budget 20

Every method gets the same number of training epochs; the trained originals follow the protocol
of ../shared/baselines (Adam 1e-3, batch 64, 60 epochs MLP / 100 epochs CNN). Wall times are
per recovery call, on a shared 2-core machine (other processes may have run at the same time).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tightfit import compress
from tightfit.demo import LeNet5, digits_split, lenet_300_100, train
from tightfit.demo.data import Split
from tightfit.errors import EvaluationError
from tightfit.evaluation import Accuracy, MaxDrop
from tightfit.export.artifact import load_model, to_bytes
from tightfit.measure.analysis import analyze, count_nonzeros
from tightfit.operators import Compose, Plan, Prune, Quantize, apply
from tightfit.recovery import (
    FineTune,
    GradualPrune,
    LearningCompression,
    ProxConnect,
    PruneSplice,
    SparseTraining,
    Tuned,
    remove_zero_neurons,
    sparsity_report,
)

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
SEEDS = (0, 1, 2)


def mnist1d_split(seed: int) -> Split:
    """mnist1d generated locally (mnist1d.data.make_dataset, no download), 60/20/20 like digits."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 4000
    args.seed = 42
    data = make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"], dtype=torch.int64)
    x = torch.cat([x, torch.tensor(data["x_test"], dtype=torch.float32)])
    y = torch.cat([y, torch.tensor(data["y_test"], dtype=torch.int64)])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = len(y)
    a, b = int(0.6 * n), int(0.8 * n)
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def setup(model_name: str, seed: int):
    if model_name == "mnist1d":
        split = mnist1d_split(0)
        factory, epochs = (lambda: lenet_300_100(in_features=40)), 60
    else:
        split = digits_split(0)
        factory, epochs = (lenet_300_100, 60) if model_name == "lenet300" else (LeNet5, 100)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = train(factory(), split, epochs=epochs, seed=seed)
    return split, model


def layer_names(model) -> list[str]:
    return [layer.name for layer in analyze(model).layers]


def global_sparsities(model, names: list[str], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities of global magnitude pruning at overall ``sparsity`` (one threshold for
    all layers): the plan every method gets, so the comparison is about recovery, not allocation."""
    weights = {n: model.get_submodule(n).weight.detach().abs().flatten() for n in names}
    everything = torch.cat(list(weights.values()))
    k = int(round(sparsity * everything.numel()))
    threshold = everything.kthvalue(max(1, k)).values if k > 0 else torch.tensor(-1.0)
    return {n: float((w <= threshold).sum()) / w.numel() for n, w in weights.items()}


def saved_model(model, plan, fresh):
    data = to_bytes(model, plan)
    return load_model(io.BytesIO(data), fresh), len(data)  # into the original (LeNet5 is a user class)


def recoveries(kind: str, loader, val, epochs: int, lc_lr: float = 0.05, lrs: list[float] | None = None) -> dict:
    if kind == "prune" and lrs:
        # Learning-rate grid: every method is compared at its own best learning rate.
        methods = {}
        for lr in lrs:
            methods[f"finetune (masked), Adam {lr:g}"] = FineTune(loader, epochs=epochs, lr=lr)
            methods[f"gradual (cubic ramp 0.7), Adam {lr:g}"] = GradualPrune(loader, epochs=epochs, lr=lr)
            methods[f"prune-and-splice, Adam {lr:g}"] = PruneSplice(loader, epochs=epochs, lr=lr)
        methods[f"L-C (ALM, SGD {lc_lr:g}, mu 1e-3 -> 10)"] = LearningCompression(
            loader, epochs=epochs, evaluate=val, lr=lc_lr
        )
        return methods
    if kind == "prune":
        return {
            "finetune (masked)": FineTune(loader, epochs=epochs, lr=1e-3),
            f"L-C (ALM, SGD {lc_lr:g}, mu 1e-3 -> 10)": LearningCompression(
                loader, epochs=epochs, evaluate=val, lr=lc_lr
            ),
            "L-C (ALM, Adam 1e-3)": LearningCompression(
                loader, epochs=epochs, evaluate=val, optimizer="adam", lr=1e-3, penalty_step=0.05
            ),
            "L-C (no multipliers)": LearningCompression(
                loader, epochs=epochs, evaluate=val, multipliers=False, lr=lc_lr
            ),
            "prune-and-splice": PruneSplice(loader, epochs=epochs, lr=1e-3),
        }
    if kind == "quant":
        inf = float("inf")
        return {
            "finetune (FakeQuantize 2-bit STE)": FineTune(loader, epochs=epochs, lr=1e-3),
            "STE on ternary grid (BinaryConnect-style)": ProxConnect(loader, epochs=epochs, sharpness=(inf, inf)),
            "ProxConnect ternary (default: sharpness 10..1e4)": ProxConnect(loader, epochs=epochs),
            "ProxConnect ternary, sharpness 1..1e3 (the old default)": ProxConnect(
                loader, epochs=epochs, sharpness=(1.0, 1e3)
            ),
        }
    raise ValueError(kind)


def run_prune_or_quant(
    kind: str,
    model_name: str,
    epochs: int,
    levels: list[float],
    lc_lr: float = 0.05,
    lrs: list[float] | None = None,
    seeds=SEEDS,
) -> dict:
    rows = []
    for seed in seeds:
        split, model = setup(model_name, seed)
        names = layer_names(model)
        val, test = Accuracy(split.loader("val", batch_size=512)), Accuracy(split.loader("test", batch_size=512))
        base = {"val": val(model), "test": test(model)}
        loader = split.loader("train", shuffle=True)
        for level in levels:
            if kind == "prune":
                per_layer = global_sparsities(model, names, level)
                plan = Plan.from_strategy(Compose([Prune()]), {n: {"prune": {"sparsity": per_layer[n]}} for n in names})
            else:
                plan = Plan.from_strategy(
                    Compose([Quantize(bits=(2, 4, 8))]), {n: {"quantize": {"bits": int(level)}} for n in names}
                )
            for method, rec in recoveries(kind, loader, val, epochs, lc_lr, lrs).items():
                candidate = apply(plan, model)
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    start = time.perf_counter()
                    try:
                        rec(candidate)
                    except EvaluationError as exc:  # a diverged run counts as a failure at chance level
                        print(f"# {method} seed {seed} level {level}: {exc}", flush=True)
                        candidate = apply(plan, model)
                        with torch.no_grad():
                            for p in candidate.parameters():
                                p.fill_(float("nan"))
                    wall = time.perf_counter() - start
                loaded, size = saved_model(candidate, plan, model)
                nz, total = count_nonzeros(loaded, names)
                row = dict(
                    seed=seed,
                    level=level,
                    method=method,
                    val=val(loaded),
                    test=test(loaded),
                    cr=total / max(1, nz),
                    size_bytes=size,
                    wall_s=wall,
                    base_val=base["val"],
                    base_test=base["test"],
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"kind": kind, "model": model_name, "epochs": epochs, "rows": rows}


def run_sparse(
    model_name: str, epochs: int, lambdas: list[float], lr: float, seeds=SEEDS, methods=("proxsg", "obproxsg", "hspg")
) -> dict:
    rows = []
    for seed in seeds:
        split, model = setup(model_name, seed)
        names = layer_names(model)
        val, test = Accuracy(split.loader("val", batch_size=512)), Accuracy(split.loader("test", batch_size=512))
        loader = split.loader("train", shuffle=True)
        x = split.x_val[:64]
        for lam in lambdas:
            for method in methods:
                candidate = copy.deepcopy(model)
                rec = SparseTraining(loader, method=method, epochs=epochs, lr=lr, lambda_=lam)
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    start = time.perf_counter()
                    rec(candidate)
                    wall = time.perf_counter() - start
                nz, total = count_nonzeros(candidate, names)
                report = sparsity_report(candidate)
                zero_groups = sum(r["zero_groups"] for r in report.values())
                slim, removed = remove_zero_neurons(candidate, example_input=x)
                row = dict(
                    seed=seed,
                    lambda_=lam,
                    method=method,
                    val=val(candidate),
                    test=test(candidate),
                    cr=total / max(1, nz),
                    nonzeros=nz,
                    zero_neurons=zero_groups,
                    removed=sum(removed.values()),
                    params_after_removal=sum(p.numel() for p in slim.parameters()),
                    params_before=sum(p.numel() for p in candidate.parameters()),
                    slim_test=test(slim),
                    wall_s=wall,
                    base_test=test(model),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"kind": "sparse", "model": model_name, "epochs": epochs, "lr": lr, "rows": rows}


def run_tuned(model_name: str, budget: int, epochs: int, recovery: str = "finetune") -> dict:
    rows = []
    for seed in SEEDS:
        split, model = setup(model_name, seed)
        val = Accuracy(split.loader("val", batch_size=512))
        test = Accuracy(split.loader("test", batch_size=512))
        loader = split.loader("train", shuffle=True)
        if recovery == "lc":
            default = LearningCompression(loader, epochs=epochs, evaluate=val)
            variants = {
                "L-C, default settings": default,
                "L-C, tuned (lr, mu_max, c_steps_per_epoch)": Tuned(
                    default, lr=(0.005, 0.1), mu_max=(1.0, 100.0), c_steps_per_epoch=(1, 8)
                ),
            }
        else:
            default = FineTune(loader, epochs=epochs, lr=3e-4)
            variants = {
                "default recovery": default,
                "tuned recovery (lr, optimizer)": Tuned(default, lr=(1e-4, 1e-2), optimizer=["adam", "sgd"]),
            }
        for name, rec in variants.items():
            start = time.perf_counter()
            result = compress(
                model,
                evaluate=val,
                strategy=Prune(sparsity=(0.0, 0.99)),
                constraint=MaxDrop(0.005),
                objective="nonzeros",
                finetune=rec,
                budget=budget,
                search="tpe",
                seed=seed,
            )
            wall = time.perf_counter() - start
            best = result.best_trial
            row = dict(
                seed=seed,
                variant=name,
                feasible=result.feasible,
                cr=result.nonzero_ratio if result.feasible else 1.0,
                val=result.metric,
                test=test(result.model),
                base_test=test(model),
                wall_s=wall,
                n_feasible=sum(t.feasible for t in result.trials),
                best_trial=best.number if best is not None else None,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"kind": "tuned", "model": model_name, "budget": budget, "epochs": epochs, "rows": rows}


def pivot(result: dict) -> str:
    """Prune results as one row per method, one column per plan sparsity: mean test drop in points
    (the mean CR of the saved files in the header; splice's own CR in brackets, its masks move)."""
    rows = result["rows"]
    levels = sorted({r["level"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    mean = statistics.mean
    head = " | ".join(f"{lv} ({1 / (1 - lv):.1f}x)" for lv in levels)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| method (test drop pp, mean of {len(seeds)} seeds) | {head} |", "|---|" + "---|" * len(levels)]
    for m in methods:
        cells = []
        for lv in levels:
            rs = [r for r in rows if r["method"] == m and r["level"] == lv]
            if not rs:
                cells.append("-")
                continue
            drop = 100 * (mean(r["base_test"] for r in rs) - mean(r["test"] for r in rs))
            cr = mean(r["cr"] for r in rs)
            cells.append(f"{drop:+.2f}" + ("" if abs(cr - 1 / (1 - lv)) < 0.2 else f" [{cr:.1f}x]"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(result: dict) -> str:
    rows = result["rows"]
    lines = []
    if result["kind"] in ("prune", "quant"):
        key = "level"
        lines.append(
            f"| method | {'overall sparsity (global magnitude plan)' if result['kind'] == 'prune' else 'bits'} | CR (nonzeros) mean | test acc % (mean over seeds) | val acc % | test drop pp | file bytes | wall s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        groups = {}
        for r in rows:
            groups.setdefault((r["method"], r[key]), []).append(r)
        for (method, level), rs in groups.items():
            mean = lambda k, rs=rs: statistics.mean(r[k] for r in rs)  # noqa: E731
            lines.append(
                f"| {method} | {level} | {mean('cr'):.1f} | {100 * mean('test'):.2f} | {100 * mean('val'):.2f} | "
                f"{100 * (mean('base_test') - mean('test')):+.2f} | {mean('size_bytes'):,.0f} | {mean('wall_s'):.1f} |"
            )
    elif result["kind"] == "sparse":
        lines.append(
            "| optimizer | lambda | CR (nonzeros) mean | test acc % | test drop pp | zero neurons | params after removal | test after removal % | wall s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        groups = {}
        for r in rows:
            groups.setdefault((r["method"], r["lambda_"]), []).append(r)
        for (method, lam), rs in groups.items():
            mean = lambda k, rs=rs: statistics.mean(r[k] for r in rs)  # noqa: E731
            lines.append(
                f"| {method} | {lam:g} | {mean('cr'):.1f} | {100 * mean('test'):.2f} | {100 * (mean('base_test') - mean('test')):+.2f} | "
                f"{mean('zero_neurons'):.1f} | {mean('params_after_removal'):,.0f} of {mean('params_before'):,.0f} | {100 * mean('slim_test'):.2f} | {mean('wall_s'):.1f} |"
            )
    else:
        lines.append("| variant | CR per seed | median CR | test acc % per seed | feasible trials | wall s |")
        lines.append("|---|---|---|---|---|---|")
        groups = {}
        for r in rows:
            groups.setdefault(r["variant"], []).append(r)
        for name, rs in groups.items():
            crs = " / ".join(f"{r['cr']:.1f}" for r in rs)
            tests = " / ".join(f"{100 * r['test']:.2f}" for r in rs)
            lines.append(
                f"| {name} | {crs} | {statistics.median(r['cr'] for r in rs):.1f} | "
                f"{tests} | {' / '.join(str(r['n_feasible']) for r in rs)} | "
                f"{statistics.mean(r['wall_s'] for r in rs):.0f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["prune", "sparse", "quant", "tuned", "table"])
    p.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5", "mnist1d"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--levels", type=float, nargs="*")
    p.add_argument("--lambdas", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--file")
    p.add_argument("--tag", default="")
    p.add_argument("--lc-lr", type=float, default=0.05)
    p.add_argument("--recovery", default="finetune", choices=["finetune", "lc"])
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--pivot", action="store_true", help="table: prune results as method x sparsity")
    p.add_argument("--methods", default="proxsg,obproxsg,hspg", help="sparse: which optimizers")
    p.add_argument(
        "--lrs", type=float, nargs="*", help="prune: compare finetune / gradual / splice at each of these Adam lrs"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    if args.kind == "table":  # several files (e.g. more seeds of one comparison) are pooled
        results = [json.loads(Path(f).read_text()) for f in args.file.split(",")]
        pooled = {**results[0], "rows": [r for res in results for r in res["rows"]]}
        print(pivot(pooled) if args.pivot else summarize(pooled))
        return
    if args.kind == "prune":
        result = run_prune_or_quant(
            "prune",
            args.model,
            args.epochs,
            args.levels or [0.8, 0.9, 0.93, 0.95, 0.97],
            args.lc_lr,
            args.lrs,
            args.seeds,
        )
    elif args.kind == "quant":
        result = run_prune_or_quant("quant", args.model, args.epochs, args.levels or [2], seeds=args.seeds)
    elif args.kind == "sparse":
        result = run_sparse(args.model, args.epochs, args.lambdas, args.lr, args.seeds, tuple(args.methods.split(",")))
    else:
        result = run_tuned(args.model, args.budget, args.epochs, args.recovery)
    result["command"] = " ".join(["python", "benchmarks/recovery.py", *(argv or sys.argv[1:])])
    path = OUT / f"recovery_{args.kind}_{args.model}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(summarize(result))
    print(f"written {path}")


if __name__ == "__main__":
    main()
