"""Long-schedule pruning on LeNet-300-100 / digits: tightfit's recoveries against iterative global
magnitude pruning with retraining (IMP), at equal total training epochs (issue 3, second "done
when"; results in docs/results/prune_adjust_*.json).

    python benchmarks/prune_adjust.py imp     --round-epochs 30 --rounds 12
    python benchmarks/prune_adjust.py gradual --epochs 210 --levels 0.97 0.975 0.98 --lr 0.01
    python benchmarks/prune_adjust.py olmp    --rounds 7 --round-epochs 30 --search-drop 0.4 --lr 0.01
    python benchmarks/prune_adjust.py imp --task fmnist-resnet --seeds 0 --round-epochs 1 --rounds 8

``--task NAME`` runs on a benchmark task of ``benchmarks.tasks`` (an accuracy task: fmnist-resnet,
fmnist-mobilenet, mnist1d) instead of digits: its cached trained model, its train loader for
every recovery, ``task.metric`` (validation) for every decision and ``task.test_metric`` (never
read by a decision) reported; results go to ``prune_adjust_<task>_<kind><tag>.json``.

The digits originals and the split are those of benchmarks/recovery.py (digits 1077/360/360, seeds 0-2,
LeNet-300-100 trained 60 epochs with Adam 1e-3). IMP follows ../shared/baselines: density x0.7 per
round by one global magnitude threshold, each round retrained ``--round-epochs`` epochs (Adam
1e-3, batch 64) with the masks held. Test accuracy is measured on the saved ``.tfz`` file reloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import OUT, SEEDS, global_sparsities, layer_names, saved_model, setup  # noqa: E402

from tightfit.evaluation import Accuracy  # noqa: E402
from tightfit.export.artifact import load_model  # noqa: E402
from tightfit.measure.analysis import count_nonzeros  # noqa: E402
from tightfit.operators import Compose, Plan, Prune, apply  # noqa: E402
from tightfit.recovery import FineTune, GradualPrune  # noqa: E402


def _plan(names, per_layer) -> Plan:
    return Plan.from_strategy(Compose([Prune()]), {n: {"prune": {"sparsity": per_layer[n]}} for n in names})


class Setup(NamedTuple):
    """One seed's trained original and what every method is measured with."""

    model: torch.nn.Module
    names: list[str]
    val: Callable[[torch.nn.Module], float]
    test: Callable[[torch.nn.Module], float]
    base: dict[str, float]
    loader: Any
    fresh: Callable[[], torch.nn.Module]  #: a new instance of the original's class, to load a .tfz into


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _spent(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since ``start``, and the machine's 1-minute load now (a shared machine)."""
    return dict(wall_s=time.perf_counter() - start[0], cpu_s=time.process_time() - start[1], load1=os.getloadavg()[0])


def _row(seed, method, model, plan, s: Setup, epochs, start, **extra):
    loaded, size = saved_model(model, plan, s.fresh())
    nz, total = count_nonzeros(loaded, s.names)
    row = dict(
        seed=seed,
        method=method,
        cr=total / max(1, nz),
        val=s.val(loaded),
        test=s.test(loaded),
        size_bytes=size,
        epochs=epochs,
        **_spent(start),
        base_val=s.base["val"],
        base_test=s.base["test"],
        **extra,
    )
    print(json.dumps(row), flush=True)
    return row, loaded


def _task(seed: int, task: str = "digits") -> Setup:
    """The seed's trained original (digits: LeNet-300-100 trained per seed; a benchmark task: its
    one cached model on the seed-0 split, the seed only seeding the training that follows)."""
    if task == "digits":
        split, model = setup("lenet300", seed)
        val, test = Accuracy(split.loader("val", batch_size=512)), Accuracy(split.loader("test", batch_size=512))
        loader, fresh = split.loader("train", shuffle=True), lambda: setup("lenet300", seed)[1]
    else:
        from benchmarks.tasks import load_task

        t = load_task(task)
        model, val, test, loader, fresh = t.model(), t.metric, t.test_metric, t.train, t.build
    return Setup(model, layer_names(model), val, test, {"val": val(model), "test": test(model)}, loader, fresh)


def run_imp(seeds, round_epochs: int, rounds: int, lr: float, task: str = "digits") -> list[dict]:
    rows = []
    for seed in seeds:
        s = _task(seed, task)
        current, density, epochs, start = s.model, 1.0, 0, _clock()
        for r in range(1, rounds + 1):
            density *= 0.7
            plan = _plan(s.names, global_sparsities(current, s.names, 1.0 - density))
            candidate = apply(plan, current)
            with torch.random.fork_rng():
                torch.manual_seed(seed * 1000 + r)
                FineTune(s.loader, epochs=round_epochs, lr=lr)(candidate)
            epochs += round_epochs
            row, current = _row(seed, "imp", candidate, plan, s, epochs, start, round=r, density=density, lr=lr)
            rows.append(row)
    return rows


def run_gradual(seeds, epochs: int, levels, lr: float, recovery: str, task: str = "digits") -> list[dict]:
    rows = []
    for seed in seeds:
        s = _task(seed, task)
        for level in levels:
            plan = _plan(s.names, global_sparsities(s.model, s.names, level))
            candidate = apply(plan, s.model)
            rec = (
                GradualPrune(s.loader, epochs=epochs, lr=lr)
                if recovery == "gradual"
                else FineTune(s.loader, epochs=epochs, lr=lr)
            )
            start = _clock()
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                rec(candidate)
            row, _ = _row(seed, recovery, candidate, plan, s, epochs, start, level=level, lr=lr)
            rows.append(row)
    return rows


def run_olmp(
    seeds,
    rounds: int,
    round_epochs: int,
    budget: int,
    search_drop: float,
    lr: float,
    max_drop: float,
    task: str = "digits",
) -> list[dict]:
    """OLMP's iterative prune-and-adjust: :func:`tightfit.prune_and_adjust` with ``search="olmp"``
    (per-layer thresholds mean + c*std; no training inside the search) and :class:`GradualPrune`
    (``round_epochs``, Adam ``lr``) as the adjust step; a round more than ``max_drop`` below the
    original on validation is undone and the next takes half the step."""
    from tightfit import prune_and_adjust

    rows = []
    for seed in seeds:
        s = _task(seed, task)
        start, history = _clock(), []

        def record(r, seed=seed, s=s, history=history, start=start):
            history.append(r)
            row = dict(
                seed=seed,
                method="olmp prune-and-adjust",
                round=r.number,
                cr=r.nonzero_ratio,
                val=r.metric,
                test=None,
                epochs=round_epochs * len(history),
                **_spent(start),
                lr=lr,
                search_drop=r.step,
                accepted=r.accepted,
                base_val=s.base["val"],
                base_test=s.base["test"],
            )
            rows.append(row)
            print(json.dumps(row), flush=True)

        result = prune_and_adjust(
            s.model,
            evaluate=s.val,
            adjust=GradualPrune(s.loader, epochs=round_epochs, lr=lr),
            max_drop=max_drop,
            rounds=rounds,
            step=search_drop,
            search="olmp",
            search_budget=budget,
            seed=seed,
            on_round=record,
        )
        # only the answer (the last accepted round) is kept as a model, so only it has a test accuracy
        if result.plan is not None:
            path = OUT / f"_tmp_answer_{seed}.tfz"
            size = result.save(path)
            loaded = load_model(io.BytesIO(path.read_bytes()), s.fresh())
            path.unlink()
            answer = max((r for r in rows if r["seed"] == seed and r["accepted"]), key=lambda r: r["round"])
            answer.update(test=s.test(loaded), size_bytes=size)
            print(json.dumps(answer), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    key = lambda r: (r["method"], r.get("round") or r.get("level"), r.get("lr"))  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    lines = [
        "| method | round / level | lr | epochs | CR (nonzeros) mean | test acc % mean | test drop pp mean | per-seed drop | val drop pp mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, step, lr), rs in groups.items():
        m = lambda k, rs=rs: statistics.mean(r[k] for r in rs)  # noqa: E731
        drops = " / ".join(f"{100 * (r['base_test'] - r['test']):+.2f}" for r in rs)
        lines.append(
            f"| {method} | {step} | {lr if lr is not None else '1e-3'} | {m('epochs'):.0f} | {m('cr'):.1f} | {100 * m('test'):.2f} | "
            f"{100 * (m('base_test') - m('test')):+.2f} | {drops} | {100 * (m('base_val') - m('val')):+.2f} |"
        )
    return "\n".join(lines)


def every_row(rows: list[dict]) -> str:
    """One line per measured model (files pooled, no means): compression, file bytes, validation
    and test accuracy, epochs, wall / CPU seconds since the method started, and the 1-minute load."""
    lines = [
        "| method | seed | round / level | epochs | CR (nonzeros) | .tfz bytes | val acc % | test acc % | wall s | CPU s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = r.get("round") or r.get("level")
        if "accepted" in r:
            step = f"{step} ({'accepted' if r['accepted'] else 'undone'})"
        test = "-" if r.get("test") is None else f"{100 * r['test']:.2f}"
        size = "-" if r.get("size_bytes") is None else f"{r['size_bytes']:,}"
        lines.append(
            f"| {r['method']} | {r['seed']} | {step} | {r['epochs']} | {r['cr']:.2f} | {size} | {100 * r['val']:.2f} | "
            f"{test} | {r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} | {r.get('load1', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def answers(rows: list[dict]) -> str:
    """Per seed, the model the prune-and-adjust loop returns: its last round that stayed within
    the validation bound (test is only reported), and the epochs the whole run spent."""
    lines = [
        "| seed | answer round | CR (nonzeros) | test drop pp | val drop pp | epochs spent (incl. rejected rounds) |",
        "|---|---|---|---|---|---|",
    ]
    picked = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        accepted = [r for r in mine if r.get("accepted")]
        spent = max(r["epochs"] for r in mine)
        if not accepted:
            lines.append(f"| {seed} | none | - | - | - | {spent} |")
            continue
        a = accepted[-1]
        picked.append(a)
        lines.append(
            f"| {seed} | {a['round']} | {a['cr']:.1f} | {100 * (a['base_test'] - a['test']):+.2f} | "
            f"{100 * (a['base_val'] - a['val']):+.2f} | {spent} |"
        )
    if picked:
        crs = sorted(r["cr"] for r in picked)
        lines.append(
            f"| mean / median | | {statistics.mean(crs):.1f} / {statistics.median(crs):.1f} | "
            f"{100 * statistics.mean(r['base_test'] - r['test'] for r in picked):+.2f} | | |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["imp", "gradual", "finetune", "olmp", "table"])
    p.add_argument("--budget", type=int, default=30, help="olmp: search evaluations per round (no training)")
    p.add_argument("--search-drop", type=float, default=0.03, help="olmp: accuracy the search may lose before training")
    p.add_argument("--max-drop", type=float, default=0.005, help="olmp: validation drop the adjusted model may have")
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--round-epochs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--epochs", type=int, default=210)
    p.add_argument("--levels", type=float, nargs="*", default=[0.97, 0.975, 0.98])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tag", default="")
    p.add_argument("--task", default="digits", help="digits (LeNet-300-100) or a benchmarks.tasks accuracy task")
    p.add_argument("--file")
    p.add_argument("--every-row", action="store_true", help="table: one line per measured model, no means")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.kind == "table":
        rows = [r for f in args.file.split(",") for r in json.loads(Path(f).read_text())["rows"]]  # files pooled
        if args.every_row:
            print(every_row(rows))
        else:
            print(answers(rows) if any("accepted" in r for r in rows) else table(rows))
        return
    if args.kind == "imp":
        rows = run_imp(args.seeds, args.round_epochs, args.rounds, args.lr, args.task)
    elif args.kind == "olmp":
        rows = run_olmp(
            args.seeds,
            args.rounds,
            args.round_epochs,
            args.budget,
            args.search_drop,
            args.lr,
            args.max_drop,
            args.task,
        )
    else:
        rows = run_gradual(args.seeds, args.epochs, args.levels, args.lr, args.kind, args.task)
    result = {
        "kind": args.kind,
        "task": args.task,
        "rows": rows,
        "command": " ".join(["python", "benchmarks/prune_adjust.py", *(argv or sys.argv[1:])]),
    }
    prefix = "" if args.task == "digits" else f"{args.task}_"
    path = OUT / f"prune_adjust_{prefix}{args.kind}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(answers(rows) if args.kind == "olmp" else table(rows))
    print(f"written {path}")


if __name__ == "__main__":
    main()
