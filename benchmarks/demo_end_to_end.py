"""The demo's 'Done when' figures (issue 2): for several seeds, run exactly what `tightfit demo`
runs and report the saved file's size ratio, the test accuracy (split no search decision saw) of
the original and of the compressed model, and the wall time.

    python benchmarks/demo_end_to_end.py --seeds 0 1 2 3 4 [--budget 30] [--out docs/results/demo.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import tightfit
from tightfit.demo.run import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--search", default="tpe")
    parser.add_argument("--recovery", default="finetune", choices=["finetune", "gradual"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result, (test_original, test_compressed) = run_demo(
                budget=args.budget,
                seed=seed,
                run_dir=Path(tmp) / "run",
                search=args.search,
                recovery=args.recovery,
            )
            wall = time.perf_counter() - started
            file_bytes = (Path(tmp) / "run" / "model.tfz").stat().st_size if result.feasible else None
            reloaded = tightfit.load(Path(tmp) / "run" / "model.tfz") if result.feasible else None
            reproduced = (
                reloaded is not None
                and tightfit.Accuracy(tightfit.demo.digits_split(seed).loader("val", 512))(reloaded) == result.metric
            )
        row = {
            "seed": seed,
            "feasible": result.feasible,
            "size_ratio": round(result.compression_ratio, 2),
            "size_bytes": result.size_bytes,
            "file_bytes_on_disk": file_bytes,
            "baseline_bytes": result.baseline_size_bytes,
            "nonzero_ratio": round(result.nonzero_ratio, 2),
            "val_original": round(result.baseline_metric, 4),
            "val_compressed": round(result.metric, 4),
            "test_original": round(test_original, 4),
            "test_compressed": round(test_compressed, 4),
            "test_drop_points": round(100 * (test_original - test_compressed), 2),
            "load_reproduces_metric": reproduced,
            "wall_s": round(wall, 1),
        }
        rows.append(row)
        print(json.dumps(row))
    ratios = [r["size_ratio"] for r in rows]
    summary = {
        "command": f"python benchmarks/demo_end_to_end.py --seeds {' '.join(map(str, args.seeds))} --budget {args.budget} --search {args.search} --recovery {args.recovery}",
        "median_size_ratio": statistics.median(ratios),
        "min_size_ratio": min(ratios),
        "max_test_drop_points": max(r["test_drop_points"] for r in rows),
        "max_wall_s": max(r["wall_s"] for r in rows),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
