"""Cheap, certified evaluation (issue 5): the default search with full vs sequential evaluation.

    PYTHONPATH=src nice -n 10 python benchmarks/cheap_eval.py compare --task digits --seeds 0 1 2 3 4 --budget 15
    PYTHONPATH=src nice -n 10 python benchmarks/cheap_eval.py compare --task mnist1d --seeds 0 1 2 3 4 --budget 15
    PYTHONPATH=src nice -n 19 python benchmarks/cheap_eval.py coverage --runs 60
    PYTHONPATH=src nice -n 15 python benchmarks/cheap_eval.py coverage --runs 80 --first-run 100 --tag _cert_a --raw
    PYTHONPATH=src python benchmarks/cheap_eval.py certcheck benchmarks/results/cheap_eval_coverage_cert_*.jsonl
    PYTHONPATH=src python benchmarks/cheap_eval.py report     # markdown tables of the results
    PYTHONPATH=src python benchmarks/cheap_eval.py trials --task mnist1d --seed 1 --finetune-epochs 3   # one search's trials
    PYTHONPATH=src python benchmarks/cheap_eval.py oracle --task digits --tag _stop13   # bounds for a perfect stage rule

``compare``: for each seed, one search with ``evaluation=None`` and one with
``evaluation=tightfit.Sequential()``, same model, data, budget and seed. Each search runs while
holding /tmp/tightfit-timing.lock (the machine's shared timing lock). Reports validation forward
passes (every sample a model was evaluated on: original, trials, final check), wall time of the
whole call, wall time up to the trial that became the answer, test accuracy and compression.

``coverage``: repeated cheap searches on mnist1d (budget 8, fine-tune of 30 steps), each with a
fresh validation set of 400 samples drawn from a pool of 8,000, checked against a large test set standing in for the data distribution (10,000 samples): how
often the certificate's 95% upper bound on the constraint value holds, and how often the
constraint is met compared with the probability the certificate stated. With ``--raw`` each row
also stores the answer's and the original's per-sample validation values and the sample split, so
``certcheck`` can compute the first certificate and the current one on the same runs.

Results are appended as JSON lines to benchmarks/results/cheap_eval_*.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from timing import timing_lock  # benchmarks/timing.py (this folder is the script's path)
from torch import nn

import tightfit
from tightfit.demo import digits_split, lenet_300_100, train
from tightfit.demo.data import Split
from tightfit.demo.run import DEMO_BITS, DEMO_FINETUNE, DEMO_MAX_DROP
from tightfit.operators import Compose, Prune, Quantize
from tightfit.pipeline import compress

RESULTS = Path(__file__).parent / "results"


def mnist1d_split(
    n_train: int = 3000, n_val: int = 1000, n_test: int = 10000, seed: int = 0, pool: int = 0
) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """MNIST-1D generated locally (mnist1d.data.make_dataset: procedural, no download); also
    returns a pool of ``pool`` further samples to draw fresh validation sets from."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    total = n_train + n_val + n_test + pool
    args.num_samples = int(total / 0.8) + 10  # make_dataset keeps 80% as "train"
    args.seed = seed
    state = np.random.get_state()  # make_dataset seeds numpy's global generator; restore it
    data = make_dataset(args)
    np.random.set_state(state)
    x = torch.tensor(np.concatenate([data["x"], data["x_test"]]), dtype=torch.float32)
    y = torch.tensor(np.concatenate([data["y"], data["y_test"]]), dtype=torch.int64)
    x_train, y_train = x[:n_train], y[:n_train]
    x_test, y_test = x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    rest_x, rest_y = x[n_train + n_test :], y[n_train + n_test :]
    split = Split(x_train, y_train, rest_x[:n_val], rest_y[:n_val], x_test, y_test)
    return split, rest_x[n_val : n_val + pool], rest_y[n_val : n_val + pool]


def mlp_1d() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def trained(make, split, name: str) -> nn.Module:
    """The original model, trained once (60 epochs, seed 0) and cached next to the results."""
    cache = RESULTS / f".original_{name}.pt"
    model = make()
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = train(make(), split, epochs=60, seed=0)
    RESULTS.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def setup(task: str, finetune_epochs: int | None = None, max_drop: float | None = None):
    if task == "digits":
        split = digits_split(0)
        model = trained(lenet_300_100, split, "digits")
        recipe = dict(
            strategy=Compose([Prune(), Quantize(bits=DEMO_BITS)]),
            constraint=tightfit.MaxDrop(DEMO_MAX_DROP),
            finetune=tightfit.FineTune(
                split.loader("train", shuffle=True),
                epochs=finetune_epochs or DEMO_FINETUNE["epochs"],
                lr=DEMO_FINETUNE["lr"],
            ),
        )
    elif task == "mnist1d":
        split, _, _ = mnist1d_split(n_test=2000)
        model = trained(mlp_1d, split, "mnist1d")
        recipe = dict(
            strategy=Compose([Prune(), Quantize(bits=DEMO_BITS)]),
            constraint=tightfit.MaxDrop(0.02),
            finetune=tightfit.FineTune(split.loader("train", shuffle=True), epochs=finetune_epochs or 1, lr=1e-3),
        )
    else:
        raise SystemExit(f"unknown task {task!r}")
    if max_drop is not None:
        recipe["constraint"] = tightfit.MaxDrop(max_drop)
    # torch's FLOP counter takes about 1.4 s to set itself up the first time a process uses it;
    # do that here, so it is not charged to whichever search happens to run first
    from tightfit.measure.analysis import layer_flops

    layer_flops(copy.deepcopy(model), split.x_val[:1])
    return split, model, recipe


def one_search(
    split, model, recipe, *, seed: int, budget: int, cheap: bool, search: str = "auto", sequential: dict | None = None
) -> dict:
    evaluation = tightfit.Sequential(**(sequential or {})) if cheap else None
    with timing_lock():
        started = time.perf_counter()
        cpu_started = time.process_time()
        result = compress(
            model,
            evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
            budget=budget,
            search=search,
            seed=seed,
            example_input=split.x_val[:1],
            evaluation=evaluation,
            **recipe,
        )
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started  # CPU seconds of this process: less sensitive to other load
    test = tightfit.Accuracy(split.loader("test", batch_size=1024))
    best = result.best_trial
    # cost up to the answer: trials up to and including the chosen one (plus the baseline's passes)
    upto = [t for t in result.trials if best is not None and t.number <= best.number]
    acc = result.accounting
    return {
        "mode": "sequential" if cheap else "full",
        "seed": seed,
        "budget": budget,
        "feasible": result.feasible,
        "val_forward_passes": acc["val_samples"],
        "val_passes_to_answer": (acc["val_samples_baseline"] + sum(t.val_samples or 0 for t in upto)) if best else None,
        "wall_s": wall,
        "cpu_s": cpu,
        "trial_s_by_fidelity": {
            level: sum(t.duration_s or 0 for t in result.trials if t.fidelity == level) for level in ("full", "screen")
        },
        "wall_s_to_answer": sum(t.duration_s or 0 for t in upto) if best else None,
        # the optimizer's own time (GP fits, acquisition, sensitivity probes) vs everything else
        "optimizer_s": sum(t.search_time_s or 0 for t in result.trials),
        "eval_s": wall - sum(t.search_time_s or 0 for t in result.trials),
        "val_passes_probes": acc.get("val_samples_probes"),
        "optimizer_wall_s": acc.get("optimizer_wall_s"),  # without its probes
        "probe_wall_s": acc.get("probe_wall_s"),
        "cost_by_fidelity": acc.get("cost_by_fidelity"),
        "trials_by_fidelity": acc["trials_by_fidelity"],
        "search": search,
        "finetune_steps": acc["finetune_steps"],
        "screened": acc["trials_by_fidelity"].get("screen", 0),
        "test_acc_original": test(model),
        "test_acc": test(result.model),
        "val_acc": result.metric,
        "val_acc_original": result.baseline_metric,
        "compression_ratio": result.compression_ratio,
        "nonzero_ratio": result.nonzero_ratio,
        "certificate": result.certificate.to_dict() if result.certificate else None,
        # per trial, for `oracle`: what each cost and how it ended (constraint values told)
        "trials": [
            {
                "number": t.number,
                "state": t.state,
                "fidelity": t.fidelity,
                "objective": t.objective,
                "constraints": list(t.constraints),
                "duration_s": t.duration_s,
                "search_time_s": t.search_time_s,
                "probe_samples": t.probe_samples,
                "probe_s": t.probe_s,
                "val_samples": t.val_samples,
                "finetune_steps": t.finetune_steps,
            }
            for t in result.trials
        ],
    }


def compare(args) -> None:
    split, model, recipe = setup(args.task, args.finetune_epochs, args.max_drop)
    out = RESULTS / f"cheap_eval_{args.task}{args.tag}.jsonl"
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for seed in args.seeds:
        for cheap in (False, True):
            row = {
                "task": args.task,
                "finetune_epochs": recipe["finetune"].epochs,
                "max_drop": recipe["constraint"].max_drop,
                **one_search(
                    split,
                    copy.deepcopy(model),
                    recipe,
                    seed=seed,
                    budget=args.budget,
                    cheap=cheap,
                    sequential=args.sequential,
                ),
                "sequential_options": args.sequential,
            }
            rows.append(row)
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "mode",
                            "seed",
                            "val_forward_passes",
                            "wall_s",
                            "test_acc",
                            "compression_ratio",
                            "screened",
                        )
                    }
                ),
                flush=True,
            )
    summarize(rows)


def trials(args) -> None:
    """One cheap (or, with --full, full-evaluation) search, trial by trial: fidelity, objective,
    constraint values (predicted for stopped and screened trials), steps, told standard error."""
    split, model, recipe = setup(args.task, args.finetune_epochs)
    result = compress(
        copy.deepcopy(model),
        evaluate=tightfit.Accuracy(split.loader("val", batch_size=512)),
        budget=args.budget,
        search="auto",
        seed=args.seed,
        example_input=split.x_val[:1],
        evaluation=None if args.full else tightfit.Sequential(),
        **recipe,
    )
    print("| trial | fidelity | objective (bytes) | constraint values | fine-tune steps | s.e. told |")
    print("|---|---|---|---|---|---|")
    for t in result.trials:
        print(
            f"| {t.number} | {t.fidelity} | {t.objective or 0:,.0f} | {', '.join(f'{c:+.4f}' for c in t.constraints)} | "
            f"{t.finetune_steps} | {t.metric_se or 0:.4f} |"
        )
    test = tightfit.Accuracy(split.loader("test", batch_size=1024))
    print(
        f"\nanswer: trial {result.best_trial.number if result.best_trial else None}, {result.compression_ratio:.2f}x, "
        f"test accuracy {test(result.model):.4f} (original {test(model):.4f})"
    )


def summarize(rows: list[dict]) -> None:
    for mode in ("full", "sequential"):
        r = [x for x in rows if x["mode"] == mode]
        if not r:
            continue
        med = lambda key, r=r: statistics.median(x[key] for x in r if x[key] is not None)  # noqa: E731
        print(
            f"{mode:10s} n={len(r)} median: val passes {med('val_forward_passes'):.0f}, wall {med('wall_s'):.1f} s, "
            f"to answer: passes {med('val_passes_to_answer'):.0f} wall {med('wall_s_to_answer'):.1f} s, "
            f"test acc {med('test_acc'):.4f} (orig {med('test_acc_original'):.4f}), CR {med('compression_ratio'):.1f}x, "
            f"nonzero ratio {med('nonzero_ratio'):.1f}x"
        )


def coverage(args) -> None:
    """Repeated cheap searches; each one's certificate is checked against a 10,000-sample test set."""
    from tightfit.evaluation.sequential import SequentialSession

    out = RESULTS / f"cheap_eval_coverage{args.tag}.jsonl"
    RESULTS.mkdir(exist_ok=True)
    base_split, pool_x, pool_y = mnist1d_split(n_val=400, n_test=10000, pool=8000)
    model = trained(mlp_1d, base_split, "mnist1d_coverage")
    max_drop = args.max_drop
    test = tightfit.Accuracy(base_split.loader("test", batch_size=2048))
    test_original = test(model)
    for run in range(args.first_run, args.first_run + args.runs):
        pick = torch.randperm(len(pool_y), generator=torch.Generator().manual_seed(1000 + run))[:400]
        split = Split(
            base_split.x_train, base_split.y_train, pool_x[pick], pool_y[pick], base_split.x_test, base_split.y_test
        )
        evaluate = tightfit.Accuracy(split.loader("val", batch_size=512))
        result = compress(
            model,
            evaluate=evaluate,
            strategy=Compose([Prune(), Quantize(bits=DEMO_BITS)]),
            constraint=tightfit.MaxDrop(max_drop),
            finetune=tightfit.FineTune(
                split.loader("train", shuffle=True), epochs=1, lr=1e-3, max_steps=args.finetune_steps
            ),
            budget=args.budget,
            seed=run,
            evaluation=tightfit.Sequential(confidence=0.95),
        )
        cert = result.certificate
        if cert is None:
            row = {"run": run, "feasible": result.feasible, "certificate": None}
        else:
            true_value = (test_original - test(result.model)) - max_drop  # constraint value on the distribution
            row = {
                "run": run,
                "probability": cert.probability,
                "bound": cert.bounds[0],
                "estimate": cert.estimates[0],
                "true_value": true_value,
                "bound_holds": true_value <= cert.bounds[0],
                "met": true_value <= 0,
                "certified": cert.certified,
                "val_value_full": (result.baseline_metric - result.metric) - max_drop,
                "method": cert.method,
            }
            if args.raw:  # what any certificate needs, to recompute old and new ones on the same runs
                session = SequentialSession(
                    tightfit.Sequential(confidence=0.95), evaluate, [tightfit.MaxDrop(max_drop)], run
                )
                session.baseline(model)  # the same sample order as the search's session
                answer = evaluate.per_sample(result.model).to(torch.int8)
                original = session.baseline_values.to(torch.int8)
                row["raw"] = {
                    "max_drop": max_drop,
                    "test_acc_original": test_original,
                    "certify_idx": session.certify_idx.tolist(),
                    "search_idx": session.search_idx.tolist(),
                    "answer": answer.tolist(),
                    "original": original.tolist(),
                }
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def stopcheck(args) -> None:
    """Were the stops right? Cheap searches as in ``compare``; every candidate stopped at a stage is
    then fine-tuned in full (same seed) and its constraint value measured on the search part, i.e.
    the value the sequential test would have ended on had it not been stopped."""
    from tightfit.evaluation.sequential import SequentialSession
    from tightfit.operators.plan import apply_plan_inplace

    split, model, recipe = setup(args.task, args.finetune_epochs)
    out = RESULTS / f"cheap_eval_stopcheck_{args.task}.jsonl"
    constraint = recipe["constraint"]
    for seed in args.seeds:
        evaluate = tightfit.Accuracy(split.loader("val", batch_size=512))
        config = tightfit.Sequential()
        result = compress(
            model,
            evaluate=evaluate,
            budget=args.budget,
            search="auto",
            seed=seed,
            example_input=split.x_val[:1],
            evaluation=config,
            **recipe,
        )
        session = SequentialSession(config, evaluate, [constraint], seed)  # the same sample order
        session.baseline(model)
        for t in result.trials:
            if t.fidelity != "stopped":
                continue
            candidate = apply_plan_inplace(t.plan, copy.deepcopy(model), recipe["strategy"])
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                recipe["finetune"](candidate)
            values = evaluate.per_sample(candidate, session.search_idx).to(torch.float64)
            drop = float((session.baseline_values[session.search_idx] - values).mean())
            row = {
                "task": args.task,
                "seed": seed,
                "trial": t.number,
                "told_value": t.constraints[0],
                "finetune_steps_taken": t.finetune_steps,
                "value_after_full_finetune": drop - constraint.max_drop,
                "would_have_met": drop - constraint.max_drop <= 0,
            }
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def report(args) -> None:
    """Markdown tables of the result files (what docs/benchmarks.md shows)."""
    for path in sorted(RESULTS.glob("cheap_eval_*.jsonl")):
        if "coverage" in path.name or "stopcheck" in path.name:
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if "optimizer_wall_s" in rows[0]:
            _report_v2(path, rows)
            continue
        r0 = rows[0]
        print(
            f"\n### {r0['task']}: budget {r0['budget']}, fine-tune {r0.get('finetune_epochs', '?')} epoch(s) per candidate ({path.name})\n"
        )
        print(
            "| seed | mode | val forward passes | to answer | wall s | wall s to answer | fine-tune steps | screened | val acc | test acc (orig) | size ratio | nonzero ratio | certificate P |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["seed"], r["mode"])):
            cert = r["certificate"]
            print(
                f"| {r['seed']} | {r['mode']} | {r['val_forward_passes']:,} | {r['val_passes_to_answer']:,} | {r['wall_s']:.1f} | "
                f"{r['wall_s_to_answer']:.1f} | {r['finetune_steps']:,} | {r['screened']} | {r['val_acc']:.4f} | "
                f"{r['test_acc']:.4f} ({r['test_acc_original']:.4f}) | {r['compression_ratio']:.1f}x | {r['nonzero_ratio']:.1f}x | "
                f"{cert['probability']:.2f} |"
                if cert
                else f"| {r['seed']} | {r['mode']} | {r['val_forward_passes']:,} | {r['val_passes_to_answer']:,} | {r['wall_s']:.1f} | "
                f"{r['wall_s_to_answer']:.1f} | {r['finetune_steps']:,} | {r['screened']} | {r['val_acc']:.4f} | "
                f"{r['test_acc']:.4f} ({r['test_acc_original']:.4f}) | {r['compression_ratio']:.1f}x | {r['nonzero_ratio']:.1f}x | - |"
            )
        full = {r["seed"]: r for r in rows if r["mode"] == "full"}
        cheap = {r["seed"]: r for r in rows if r["mode"] == "sequential"}
        seeds = sorted(set(full) & set(cheap))
        if seeds:
            med = statistics.median
            print(f"\nmedians over seeds {seeds}:\n")
            print("| | full | sequential | ratio (median of per-seed ratios) |")
            print("|---|---|---|---|")
            for key, fmt in [
                ("val_forward_passes", "{:,.0f}"),
                ("wall_s", "{:.1f}"),
                ("cpu_s", "{:.1f}"),
                ("val_passes_to_answer", "{:,.0f}"),
                ("wall_s_to_answer", "{:.1f}"),
                ("test_acc", "{:.4f}"),
                ("compression_ratio", "{:.2f}"),
                ("nonzero_ratio", "{:.2f}"),
            ]:
                a, b = med([full[s][key] for s in seeds]), med([cheap[s][key] for s in seeds])
                ratio = med([cheap[s][key] / full[s][key] for s in seeds])
                print(f"| {key} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f} |")
    for name in ("cheap_eval_coverage.jsonl", "cheap_eval_coverage_v1.jsonl"):
        _report_coverage(RESULTS / name)
    for path in sorted(RESULTS.glob("cheap_eval_coverage_promote*.jsonl")) + sorted(
        RESULTS.glob("cheap_eval_coverage_stop*.jsonl")
    ):
        _report_coverage(path)
    cert_rows = sorted(RESULTS.glob("cheap_eval_coverage_cert_*.jsonl"))
    if cert_rows:
        certcheck(argparse.Namespace(files=cert_rows))
    for path in sorted(RESULTS.glob("cheap_eval_stopcheck_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        met = [r for r in rows if r["would_have_met"]]
        closest = min(r["value_after_full_finetune"] for r in rows) if rows else float("nan")
        print(f"\n### stops checked ({path.name})\n")
        print(
            f"- {len(rows)} candidates stopped over seeds {sorted({r['seed'] for r in rows})}; fine-tuned in full afterwards, "
            f"{len(met)} would have met the constraint on the search part; smallest constraint value after the full "
            f"fine-tune {closest:+.4f} (<= 0 is met)"
        )


def _report_coverage(path: Path) -> None:
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done = [r for r in rows if r.get("bound") is not None]
        n = len(done)
        if n:
            holds = sum(r["bound_holds"] for r in done)
            met = sum(r["met"] for r in done)
            mean_p = statistics.mean(r["probability"] for r in done)
            certified = [r for r in done if r["certified"]]
            print(f"\n### coverage ({path.name}: {len(rows)} runs, {n} with a certificate)\n")
            lo, hi = _binomial_interval(holds, n)
            print(
                f"- 95% upper bound on the constraint value held in {holds}/{n} = {holds / n:.1%} of runs (Clopper-Pearson 95%: {lo:.1%}-{hi:.1%})"
            )
            print(
                f"- constraint met on the 10,000-sample test set in {met}/{n} = {met / n:.1%} of runs; mean stated probability {mean_p:.3f}"
            )
            if certified:
                ok = sum(r["met"] for r in certified)
                print(
                    f"- runs certified at 95% (bound <= 0): {len(certified)}; of these, met on the test set: {ok}/{len(certified)}"
                )
            for lo, hi in [(0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.01)]:
                b = [r for r in done if lo <= r["probability"] < hi]
                if b:
                    print(
                        f"- stated P in [{lo:.2f}, {min(hi, 1):.2f}): {len(b)} runs, mean stated {statistics.mean(r['probability'] for r in b):.3f}, "
                        f"met {sum(r['met'] for r in b)}/{len(b)}"
                    )
            naive = [r for r in done if r.get("val_value_full") is not None]
            if naive:
                print(
                    f"- for contrast, the full validation set (used by the search) said 'met' in {sum(r['val_value_full'] <= 0 for r in naive)}/{len(naive)} runs"
                )


def _old_certificate(held: torch.Tensor) -> tuple[float, float]:
    """The first certificate (commit c84b41e and before), recomputed: a normal bound and a flat-prior
    P(met) = Phi(-mean / se) from the held-out statistics, variance floored by 2 pseudo-samples of 1."""
    from tightfit.evaluation.statistics import mean_estimate, normal_cdf, z_value

    e = mean_estimate(held, prior_variance=1.0, prior_weight=2.0)
    return e.mean + z_value(0.1) * e.se, normal_cdf(-e.mean / e.se)


def _binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    return (
        0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1)),
        1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k)),
    )


def certcheck(args) -> None:
    """Old and new certificates recomputed on the same coverage runs (rows written with --raw):
    bound coverage with its binomial interval, and the stated probability's calibration by bin."""
    from scipy.stats import binom

    from tightfit.evaluation.certificate import StatisticForm, certify
    from tightfit.evaluation.constraints import MaxDrop

    rows = []
    for path in args.files:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    runs = len(rows)
    rows = sorted((r for r in rows if r.get("raw")), key=lambda r: r["run"])
    table = {"old": [], "new": [], "new bound, flat prior": []}
    for r in rows:
        raw = r["raw"]
        md = raw["max_drop"]
        answer = torch.tensor(raw["answer"], dtype=torch.float64)
        original = torch.tensor(raw["original"], dtype=torch.float64)
        held_idx, search_idx = torch.tensor(raw["certify_idx"]), torch.tensor(raw["search_idx"])
        stat = (original - answer) - md
        held, search = stat[held_idx].unsqueeze(1), stat[search_idx].unsqueeze(1)
        form = StatisticForm("paired01", offset=-md, prior_variance=1.0)
        new = certify(held, [MaxDrop(md)], 0.95, [1.0], forms=[form], search_statistics=search)
        flat = certify(held, [MaxDrop(md)], 0.95, [1.0], forms=[form])
        old_bound, old_p = _old_certificate(held[:, 0])
        # rows store the certificate of the code they ran with: check it is reproduced
        stored = (old_bound, old_p) if "Phi(-mean/se)" in r.get("method", "") else (new.bounds[0], new.probability)
        assert abs(stored[0] - r["bound"]) < 2e-3 and abs(stored[1] - r["probability"]) < 1e-9, (
            f"run {r['run']} not reproduced"
        )
        truth = r["true_value"]
        table["old"].append((old_bound, old_p, truth))
        table["new"].append((new.bounds[0], new.probability, truth))
        table["new bound, flat prior"].append((flat.bounds[0], flat.probability, truth))
    n = len(rows)
    met = sum(t <= 0 for _, _, t in table["new"])
    print(
        f"\n### certificate check ({', '.join(Path(p).name for p in args.files)}): {runs} runs, {n} with a certificate, "
        f"runs {rows[0]['run']}-{rows[-1]['run']}; constraint met (10,000 test samples) in {met}/{n}\n"
    )
    print(
        "| certificate | 95% bound held | 95% interval | P(<= this many \\| exactly 95%) | certified (bound <= 0) | certified and met | mean stated P | Brier |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, items in table.items():
        held_count = sum(t <= b for b, _, t in items)
        lo, hi = _binomial_interval(held_count, n)
        cert = [(b, p, t) for b, p, t in items if b <= 0]
        brier = statistics.mean((p - (t <= 0)) ** 2 for _, p, t in items)
        print(
            f"| {name} | {held_count}/{n} = {held_count / n:.1%} | {lo:.1%}-{hi:.1%} | {binom.cdf(held_count, n, 0.95):.2f} | "
            f"{len(cert)} | {sum(t <= 0 for _, _, t in cert)}/{len(cert)} | {statistics.mean(p for _, p, _ in items):.3f} | {brier:.3f} |"
        )
    print("\nstated probability by bin: runs, mean stated, fraction met (95% interval)\n")
    bins = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 0.95), (0.95, 1.01)]
    print(
        "| certificate | "
        + " | ".join(f"[{lo:.2f}, {min(hi, 1):.2f}{')' if hi < 1 else ']'}" for lo, hi in bins)
        + " |"
    )
    print("|---|" + "---|" * len(bins))
    for name, items in table.items():
        cells = []
        for lo, hi in bins:
            b = [(p, t) for _, p, t in items if lo <= p < hi]
            if not b:
                cells.append("-")
                continue
            k = sum(t <= 0 for _, t in b)
            a, z = _binomial_interval(k, len(b))
            cells.append(f"{len(b)}: {statistics.mean(p for p, _ in b):.2f} vs {k / len(b):.2f} ({a:.2f}-{z:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


def _report_v2(path: Path, rows: list[dict]) -> None:
    """Tables of the current rows: probes counted, optimizer time apart, stopped candidates."""
    r0 = rows[0]
    options = (
        f", Sequential({', '.join(f'{k}={v}' for k, v in r0['sequential_options'].items())})"
        if r0.get("sequential_options")
        else ""
    )
    print(
        f"\n### {r0['task']}: search={r0.get('search', 'auto')}{options}, budget {r0['budget']}, fine-tune {r0.get('finetune_epochs', '?')} epoch(s) per candidate ({path.name})\n"
    )
    print(
        "| seed | mode | val fwd passes (probes) | wall s | optimizer s | evaluation s | fine-tune steps | full / screened / stopped | val acc | test acc (orig) | size ratio | certificate P |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["seed"], r["mode"])):
        by = r["trials_by_fidelity"]
        cert = r["certificate"]
        print(
            f"| {r['seed']} | {r['mode']} | {r['val_forward_passes']:,} ({r['val_passes_probes']:,}) | {r['wall_s']:.1f} | "
            f"{r['optimizer_wall_s']:.1f} | {r['wall_s'] - r['optimizer_wall_s']:.1f} | {r['finetune_steps']:,} | "
            f"{by.get('full', 0)} / {by.get('screen', 0)} / {by.get('stopped', 0)} | {r['val_acc']:.4f} | "
            f"{r['test_acc']:.4f} ({r['test_acc_original']:.4f}) | {r['compression_ratio']:.1f}x | "
            + (f"{cert['probability']:.2f} |" if cert else "- |")
        )
    full = {r["seed"]: r for r in rows if r["mode"] == "full"}
    cheap = {r["seed"]: r for r in rows if r["mode"] == "sequential"}
    seeds = sorted(set(full) & set(cheap))
    if not seeds:
        return
    for r in rows:
        r["eval_wall_s"] = r["wall_s"] - r["optimizer_wall_s"]
        r["val_passes_without_probes"] = r["val_forward_passes"] - r["val_passes_probes"]
    med = statistics.median
    print(f"\nmedians over seeds {seeds}:\n")
    print("| | full | sequential | ratio (median of per-seed ratios) |")
    print("|---|---|---|---|")
    for key, fmt in [
        ("val_forward_passes", "{:,.0f}"),
        ("val_passes_probes", "{:,.0f}"),
        ("val_passes_without_probes", "{:,.0f}"),
        ("wall_s", "{:.1f}"),
        ("optimizer_wall_s", "{:.1f}"),
        ("eval_wall_s", "{:.1f}"),
        ("cpu_s", "{:.1f}"),
        ("finetune_steps", "{:,.0f}"),
        ("test_acc", "{:.4f}"),
        ("val_acc", "{:.4f}"),
        ("compression_ratio", "{:.2f}"),
        ("nonzero_ratio", "{:.2f}"),
    ]:
        a, b = med([full[s][key] for s in seeds]), med([cheap[s][key] for s in seeds])
        ratio = med([cheap[s][key] / full[s][key] for s in seeds])
        print(f"| {key} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f} |")
    diffs = [cheap[s]["test_acc"] - full[s]["test_acc"] for s in seeds]
    print(f"\nper-seed test accuracy, sequential minus full (points): {', '.join(f'{100 * d:+.2f}' for d in diffs)}")
    if len(seeds) > 1:
        from scipy.stats import t as student

        # paired, on the log scale: is the compression difference more than the seeds' spread?
        logs = [math.log(cheap[s]["compression_ratio"] / full[s]["compression_ratio"]) for s in seeds]
        mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
        q = student.ppf(0.975, len(logs) - 1)
        print(
            f"compression, sequential / full: geometric mean {math.exp(mean):.2f} (95% t interval "
            f"{math.exp(mean - q * se):.2f}-{math.exp(mean + q * se):.2f}); "
            f"test accuracy difference: mean {100 * statistics.mean(diffs):+.2f} points "
            f"({100 * (statistics.mean(diffs) - q * statistics.stdev(diffs) / math.sqrt(len(diffs))):+.2f} to "
            f"{100 * (statistics.mean(diffs) + q * statistics.stdev(diffs) / math.sqrt(len(diffs))):+.2f})"
        )


def oracle(args) -> None:
    """How far could a better stage rule go? Rows of ``compare`` (with per-trial records) replayed
    with two oracles that know each candidate's end: every candidate fine-tuned in full that ended
    infeasible had instead cost (a) a median stopped trial of these runs (a perfect stage), or
    (b) a median screened trial (perfect screening before any fine-tune). Everything else, the
    optimizer's time and the candidates, is kept as measured, so this is the bound for the same
    search path, not a run."""
    path = RESULTS / f"cheap_eval_{args.task}{args.tag}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "trials" in r]
    full = {r["seed"]: r for r in rows if r["mode"] == "full"}
    cheap = {r["seed"]: r for r in rows if r["mode"] == "sequential"}
    seeds = sorted(set(full) & set(cheap))
    if not seeds:
        raise SystemExit(f"{path.name}: no paired rows with per-trial records (run compare first)")
    med = statistics.median

    def evaluation_s(t: dict) -> float:  # a trial's duration counts the optimizer's suggestion too
        return (t["duration_s"] or 0) - (t["search_time_s"] or 0)

    def typical(level: str) -> dict:
        trials = [t for s in seeds for t in cheap[s]["trials"] if t["fidelity"] == level and t["state"] == "COMPLETE"]
        if not trials:  # no such trial in these runs: the oracle column reads nan
            return {"duration_s": float("nan"), "val_samples": float("nan"), "finetune_steps": float("nan")}
        return {
            "duration_s": med([evaluation_s(t) for t in trials]),
            **{key: med([t[key] or 0 for t in trials]) for key in ("val_samples", "finetune_steps")},
        }

    stopped, screened = typical("stopped"), typical("screen")
    print(f"\n### {args.task}: oracle bounds over seeds {seeds} ({path.name})\n")
    print(
        f"median stopped trial (evaluation, without the optimizer's suggestion): {stopped['duration_s']:.3f} s, {stopped['val_samples']:.0f} samples, "
        f"{stopped['finetune_steps']:.0f} steps; median screened trial: {screened['duration_s']:.3f} s, "
        f"{screened['val_samples']:.0f} samples\n"
    )
    print(
        "| seed | promoted (ended infeasible) | wall ratio: measured / perfect stage / perfect screen | "
        "same, without the optimizer's time | passes ratio: measured / perfect stage / perfect screen |"
    )
    print("|---|---|---|---|---|")
    columns: dict[str, list[float]] = {}
    for s in seeds:
        c, f = cheap[s], full[s]
        promoted = [t for t in c["trials"] if t["fidelity"] == "full" and t["state"] == "COMPLETE"]
        wasted = [t for t in promoted if any(v > 0 for v in t["constraints"])]
        spent = sum(evaluation_s(t) for t in wasted)  # each keeps its optimizer time
        read = sum(t["val_samples"] or 0 for t in wasted)
        wall = [
            c["wall_s"],
            c["wall_s"] - spent + len(wasted) * stopped["duration_s"],
            c["wall_s"] - spent + len(wasted) * screened["duration_s"],
        ]
        passes = [
            c["val_forward_passes"],
            c["val_forward_passes"] - read + len(wasted) * stopped["val_samples"],
            c["val_forward_passes"] - read + len(wasted) * screened["val_samples"],
        ]
        ratios = {
            "wall": [w / f["wall_s"] for w in wall],
            "wall_no_opt": [(w - c["optimizer_wall_s"]) / (f["wall_s"] - f["optimizer_wall_s"]) for w in wall],
            "passes": [p / f["val_forward_passes"] for p in passes],
        }
        for key, values in ratios.items():
            for i, v in enumerate(values):
                columns.setdefault(f"{key}{i}", []).append(v)
        cells = [" / ".join(f"{v:.2f}" for v in ratios[k]) for k in ("wall", "wall_no_opt", "passes")]
        print(f"| {s} | {len(promoted)} ({len(wasted)}) | " + " | ".join(cells) + " |")
    cells = [" / ".join(f"{med(columns[f'{k}{i}']):.2f}" for i in range(3)) for k in ("wall", "wall_no_opt", "passes")]
    print("| median | | " + " | ".join(cells) + " |")


def main() -> None:
    # One intra-op thread: on a 2-core machine shared with other jobs, more threads only contend.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    c.add_argument("--budget", type=int, default=30)
    c.add_argument("--finetune-epochs", type=int, default=None, help="default: the demo's 6 (digits), 1 (mnist1d)")
    c.add_argument("--tag", default="", help="suffix of the results file")
    c.add_argument("--max-drop", type=float, default=None, help="the constraint (default: 0.005 digits, 0.02 mnist1d)")
    c.add_argument(
        "--sequential",
        type=json.loads,
        default=None,
        help="options of tightfit.Sequential as JSON, e.g. '{\"probe_samples\": 64}'",
    )
    c.set_defaults(fn=compare)
    v = sub.add_parser("coverage")
    v.add_argument("--runs", type=int, default=60)
    v.add_argument("--budget", type=int, default=8)
    v.add_argument("--max-drop", type=float, default=0.02)
    v.add_argument("--finetune-steps", type=int, default=30)
    v.add_argument(
        "--first-run", type=int, default=0, help="runs first-run .. first-run + runs - 1 (seeds and validation draws)"
    )
    v.add_argument("--tag", default="", help="suffix of the results file")
    v.add_argument("--raw", action="store_true", help="store the answer's and the original's per-sample values")
    v.set_defaults(fn=coverage)
    k = sub.add_parser("stopcheck")
    k.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    k.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    k.add_argument("--budget", type=int, default=30)
    k.add_argument("--finetune-epochs", type=int, default=None)
    k.set_defaults(fn=stopcheck)
    q = sub.add_parser("certcheck")
    q.add_argument("files", nargs="+", help="coverage rows written with --raw")
    q.set_defaults(fn=certcheck)
    r = sub.add_parser("report")
    r.set_defaults(fn=report)
    o = sub.add_parser("oracle", help="bounds for a perfect stage rule, from compare's per-trial records")
    o.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    o.add_argument("--tag", default="")
    o.set_defaults(fn=oracle)
    t = sub.add_parser("trials", help="one search, trial by trial")
    t.add_argument("--task", choices=("digits", "mnist1d"), required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--budget", type=int, default=30)
    t.add_argument("--finetune-epochs", type=int, default=None)
    t.add_argument("--full", action="store_true", help="full evaluation instead of Sequential()")
    t.set_defaults(fn=trials)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
