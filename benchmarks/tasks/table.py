"""The docs/tasks.md table from the cached weights: ``python -m benchmarks.tasks.table``.

For every trained task: parameters, split sizes, the training wall time (from the weights'
sidecar, as measured by benchmarks/tasks/train.py), the float32 file size (``tightfit.save`` of
the model) and the validation and test metrics, recomputed here through the task's own loaders
and tightfit metric objects (so the table also checks that ``load_task`` reproduces training's
numbers)."""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.tasks import TASK_NAMES, cache, load_task
from benchmarks.tasks.core import PRETRAINED


def _fmt_metric(name: str, value: float) -> str:
    if name.startswith("negative"):
        return f"loss {-value:.4f} (ppl {math.exp(-value):.2f})"
    if name.startswith("embedding fidelity"):
        return f"cosine {value:.4f}"
    return f"{100 * value:.2f}%"


def row(name: str) -> str | None:
    import tightfit

    if not cache.is_cached(name) and name not in PRETRAINED:
        return None
    task = load_task(name)
    model = task.model()
    meta = task.meta
    with tempfile.TemporaryDirectory() as tmp:
        size = tightfit.save(model, Path(tmp) / f"{name}.tfz")
    val, test = task.metric(model), task.test_metric(model)
    sizes = f"{len(task.train.dataset):,} / {len(task.val.dataset):,} / {len(task.test.dataset):,}"
    params = sum(p.numel() for p in model.parameters())
    how = f"`python -m benchmarks.tasks.train {name}`"
    minutes = f"{meta.get('train_seconds', float('nan')) / 60:.1f} min"
    if name in PRETRAINED:  # weights from a package: the install line, nothing trained
        how, minutes = f"`{task.notes['install'].split('   ')[0]}`", "none (pretrained)"
    return (
        f"| {name} | {params:,} | {sizes} | {how} | {minutes} | {size:,} | {_fmt_metric(task.metric_name, val)} | "
        f"{_fmt_metric(task.metric_name, test)} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(TASK_NAMES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| task | parameters | train / val / test | training command | training wall time | float32 file bytes | validation | test |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.names:
        start = time.time()
        line = row(name)
        print(line if line else f"| {name} | not trained (no cached weights) | | | | | | |", flush=True)
        print(f"<!-- {name}: row computed in {time.time() - start:.0f}s -->", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
