"""Scale-out and durability figures (issue 6) against a PostgreSQL server.

    URL=postgresql://tightfit:tightfit@127.0.0.1:5432/tightfit     # e.g. from `bash .ci/postgres.sh`
    flock /tmp/tightfit-timing.lock python benchmarks/scale_workers.py throughput --storage $URL --workers 1 2 4
    python benchmarks/scale_workers.py kills --storage $URL            # 200 trials, 4 workers, a SIGKILL every 20
    python benchmarks/scale_workers.py restart --storage $URL          # SIGKILLed `tightfit run` vs uninterrupted

Trials are cheap on purpose: the tiny model of tests/scale_project (3 linear layers, 256 inputs) and
a fixed sleep per evaluation (TIGHTFIT_TRIAL_SLEEP) standing in for a fine-tune, so the storage's
share of each trial shows. Results go to docs/results/scale_*.json and are printed as tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "tests" / "scale_project"
RESULTS = ROOT / "docs" / "results"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
CLI = [sys.executable, "-m", "tightfit.cli.app"]


def _project(tmp: Path, budget: int, storage: str | None, study: str, search: str = "tpe") -> Path:
    for name in ("scale_model.py", "scale.toml"):
        (tmp / name).write_text((PROJECT / name).read_text())
    text = (tmp / "scale.toml").read_text().replace("budget = 12", f"budget = {budget}")
    text = text.replace('study_name = "scale"', f'study_name = "{study}"').replace(
        'search = "tpe"', f'search = "{search}"'
    )
    if storage:
        text = f'storage = "{storage}"\n' + text
    (tmp / "scale.toml").write_text(text)
    return tmp / "scale.toml"


def _study(storage: str, name: str):
    import optuna

    from tightfit.scale.storage import with_installed_driver

    return optuna.load_study(study_name=name, storage=with_installed_driver(storage))


# --- one timed worker process (throughput) ---------------------------------------------------------


def _timed_worker(args: argparse.Namespace) -> None:
    """A worker whose storage calls are timed: wall time spent in them on the trial's own thread
    (the heartbeat thread's writes run beside the evaluation and are counted apart)."""
    sys.path.insert(0, str(Path(args.config).parent))
    from optuna.storages._cached_storage import _CachedStorage

    from tightfit.cli.config import build_arguments, load_config
    from tightfit.scale import open_storage, work

    # The study talks to Optuna's caching layer over the RDB storage; time that layer's calls.
    storage = _CachedStorage(open_storage(args.storage, heartbeat_interval=1, grace_period=5))
    spent = {"main": 0.0, "heartbeat": 0.0, "calls": 0}
    by_name: dict[str, list] = {}
    lock = threading.Lock()
    local = threading.local()  # call depth: RDBStorage methods call each other; time the outermost
    main = threading.main_thread()
    for name in dir(storage):
        method = getattr(storage, name)
        if name.startswith("_") or not callable(method) or name.startswith("get_heartbeat"):
            continue

        def timed(*a, __method=method, __name=name, **k):
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            started = time.perf_counter()
            try:
                return __method(*a, **k)
            finally:
                local.depth = depth
                if depth == 0:
                    on_main = threading.current_thread() is main
                    with lock:
                        spent["main" if on_main else "heartbeat"] += time.perf_counter() - started
                        spent["calls"] += on_main
                        if on_main:
                            entry = by_name.setdefault(__name, [0, 0.0])
                            entry[0] += 1
                            entry[1] += time.perf_counter() - started

        setattr(storage, name, timed)
    parsed, base = load_config(args.config)
    arguments = build_arguments(parsed, base, Path(args.config))
    arguments.update(storage=storage, study_name=args.study)
    started = time.perf_counter()
    evaluated = work(**arguments)
    wall = time.perf_counter() - started
    Path(args.out).write_text(
        json.dumps(
            {
                "evaluated": evaluated,
                "wall_s": wall,
                "storage_s": spent["main"],
                "heartbeat_s": spent["heartbeat"],
                "storage_calls": spent["calls"],
                "by_method": by_name,
            }
        )
    )


def throughput(args: argparse.Namespace) -> dict:
    rows = []
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            study = f"bench-{n}w-{uuid.uuid4().hex[:6]}"
            config = _project(Path(tmp), args.trials, args.storage, study, args.search)
            env = {**ENV, "TIGHTFIT_TRIAL_SLEEP": str(args.sleep)}
            outs = [Path(tmp) / f"w{i}.json" for i in range(n)]
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "_worker",
                        "--config",
                        str(config),
                        "--storage",
                        args.storage,
                        "--study",
                        study,
                        "--out",
                        str(out),
                    ],
                    env=env,
                )
                for out in outs
            ]
            for p in procs:
                if p.wait(timeout=900) != 0:
                    raise SystemExit(f"worker exited with {p.returncode}")
            stats = [json.loads(o.read_text()) for o in outs]
            if args.verbose:
                print(json.dumps([s["by_method"] for s in stats], indent=1))
            trials = _study(args.storage, study).get_trials()
            done = [t for t in trials if t.state.name == "COMPLETE"]
            first = min(t.datetime_start for t in done)
            last = max(t.datetime_complete for t in done)
            span = (last - first).total_seconds()
            evaluated = sum(s["evaluated"] for s in stats)
            durations = [t.user_attrs["duration_s"] for t in done]
            rows.append(
                {
                    "workers": n,
                    "completed": len(done),
                    "trials_per_s": len(done) / span,
                    "storage_ms_per_trial": 1000 * sum(s["storage_s"] for s in stats) / evaluated,
                    "storage_calls_per_trial": sum(s["storage_calls"] for s in stats) / evaluated,
                    "heartbeat_ms_per_trial": 1000 * sum(s["heartbeat_s"] for s in stats) / evaluated,
                    "evaluation_s_median": statistics.median(durations),
                    "span_s": span,
                }
            )
            print(rows[-1], flush=True)
    return {"trials": args.trials, "sleep_s": args.sleep, "search": args.search, "rows": rows}


# --- 200 trials, 4 workers, a SIGKILL every 20 trials ----------------------------------------------


def kills(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        study = f"kills-{uuid.uuid4().hex[:6]}"
        config = _project(Path(tmp), args.trials, args.storage, study)
        env = {**ENV, "TIGHTFIT_TRIAL_SLEEP": str(args.sleep)}
        command = [*CLI, "worker", str(config), "--heartbeat-interval", "1", "--grace-period", str(args.grace)]
        logs = open(Path(tmp) / "workers.log", "w")  # noqa: SIM115 (the workers write to it until the end)

        def start():
            return subprocess.Popen(command, env=env, stdout=logs, stderr=subprocess.STDOUT)

        workers = [start() for _ in range(args.workers)]
        started = time.monotonic()
        killed = []
        next_kill = args.every
        while True:
            try:
                trials = _study(args.storage, study).get_trials(deepcopy=False)
            except KeyError:
                trials = []
            complete = sum(t.state.name == "COMPLETE" for t in trials)
            if all(w.poll() is not None for w in workers):
                break
            if complete >= next_kill and complete < args.trials:
                victim = rng.choice([w for w in workers if w.poll() is None])
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed.append({"at_complete": complete, "pid": victim.pid})
                workers[workers.index(victim)] = start()  # a replacement joins
                next_kill += args.every
            time.sleep(0.05)
        wall = time.monotonic() - started
        codes = [w.returncode for w in workers]

        # the result: `tightfit run` on the finished study picks the best trial in the storage
        finish = subprocess.run([*CLI, "run", str(config)], env=env, capture_output=True, text=True, timeout=300)
        summary = json.loads((Path(tmp) / "runs" / "scale" / "summary.json").read_text())
        trials = _study(args.storage, study).get_trials()

    from tightfit.pipeline import best_feasible
    from tightfit.search.loop import RETRY_OF, trial_record

    complete = [t for t in trials if t.state.name == "COMPLETE"]
    stale = [t for t in trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    retried = {t.user_attrs.get(RETRY_OF): t for t in trials if RETRY_OF in t.user_attrs}

    def completed_lineage(number: int) -> bool:
        t = retried.get(number)
        return t is not None and (t.state.name == "COMPLETE" or completed_lineage(t.number))

    lineage = [t.user_attrs.get(RETRY_OF, t.number) for t in complete]
    best = best_feasible([trial_record(t) for t in trials])
    killed_pids = {k["pid"] for k in killed}

    def pid(t):
        worker = t.user_attrs.get("worker")
        return int(worker.rsplit(":", 1)[1]) if worker else None

    of_killed = [t for t in stale if pid(t) in killed_pids or pid(t) is None]
    false_stale = [t for t in stale if t not in of_killed]
    return {
        "budget": args.trials,
        "workers": args.workers,
        "kill_every": args.every,
        "sleep_s": args.sleep,
        "grace_period_s": args.grace,
        "wall_s": wall,
        "kills": len(killed),
        "killed": killed,
        "stale_trials_detected": len(stale),
        "stale_trials_of_killed_workers": len(of_killed),
        # live workers whose heartbeat came later than the grace period (a starved machine): their
        # result was dropped and the retry evaluated instead (wasted work, no double completion)
        "stale_trials_of_live_workers": len(false_stale),
        "stale_trials_lost": sum(not completed_lineage(t.number) for t in stale),
        "completed": len(complete),
        "duplicated": len(lineage) - len(set(lineage)),
        "duplicate_params": len(complete) - len({json.dumps(t.params, sort_keys=True) for t in complete}),
        "left_running": sum(t.state.name == "RUNNING" for t in trials),
        "evaluation_failures": sum(t.state.name == "FAIL" and "error" in t.user_attrs for t in trials),
        "worker_exit_codes": codes,
        "run_exit_code": finish.returncode,
        "result_best_trial": summary["best_trial"],
        "storage_best_feasible_trial": best.number if best else None,
        "result_equals_storage_best": summary["best_trial"] == (best.number if best else None),
    }


# --- SIGKILLed `tightfit run`, started again, vs uninterrupted ------------------------------------


def restart(args: argparse.Namespace) -> dict:
    rows = []
    for storage, workers in ((None, 1), (None, 2), (args.storage, 1), (args.storage, 3)):
        counts = {}
        for mode in ("uninterrupted", "killed"):
            with tempfile.TemporaryDirectory() as tmp:
                study = f"restart-{uuid.uuid4().hex[:6]}"
                config = _project(Path(tmp), args.trials, storage, study)
                env = {**ENV, "TIGHTFIT_TRIAL_SLEEP": str(args.sleep)}
                command = [
                    *CLI,
                    "run",
                    str(config),
                    "--workers",
                    str(workers),
                    "--heartbeat-interval",
                    "1",
                    "--grace-period",
                    "3",
                ]
                url = storage or f"sqlite:///{Path(tmp) / 'runs' / 'scale' / 'study.db'}"
                kills = 0
                if mode == "killed":
                    for _ in range(2):  # SIGKILL twice, at about 1/3 and 2/3 of the budget
                        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        target = args.trials * (kills + 1) // 3
                        while proc.poll() is None:
                            try:
                                done = sum(
                                    t.state.name == "COMPLETE" for t in _study(url, study).get_trials(deepcopy=False)
                                )
                            except Exception:
                                done = 0
                            if done >= target:
                                proc.send_signal(signal.SIGKILL)
                                kills += 1
                                break
                            time.sleep(0.05)
                        proc.wait()
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
                trials = _study(url, study).get_trials()
                counts[mode] = {
                    "completed": sum(t.state.name == "COMPLETE" for t in trials),
                    "interrupted_or_stale": sum(t.state.name == "FAIL" and "error" not in t.user_attrs for t in trials),
                    "kills": kills,
                    "best": json.loads((Path(tmp) / "runs" / "scale" / "summary.json").read_text())["best_trial"],
                }
        rows.append({"storage": "postgresql" if storage else "sqlite (run dir)", "workers": workers, **counts})
        print(rows[-1], flush=True)
    return {"budget": args.trials, "sleep_s": args.sleep, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--storage", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--trials", type=int, default=80)
    p.add_argument("--sleep", type=float, default=0.05)
    p.add_argument("--search", default="tpe")
    p.add_argument("--verbose", action="store_true")
    p = sub.add_parser("kills")
    p.add_argument("--storage", required=True)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--sleep", type=float, default=0.3)
    p.add_argument("--grace", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("restart")
    p.add_argument("--storage", required=True)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--sleep", type=float, default=0.1)
    p = sub.add_parser("_worker")
    for name in ("--config", "--storage", "--study", "--out"):
        p.add_argument(name, required=True)
    args = parser.parse_args()
    if args.command == "_worker":
        return _timed_worker(args)
    result = {"throughput": throughput, "kills": kills, "restart": restart}[args.command](args)
    result["command"] = " ".join(["python", "benchmarks/scale_workers.py", *sys.argv[1:]]).replace(args.storage, "$URL")
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale_{args.command}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("killed",)}, indent=2, default=str))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
