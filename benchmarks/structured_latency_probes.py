"""Quick looks behind benchmarks/structured_latency.py (issue 18), on one benchmark task:

    PYTHONPATH=src:. python benchmarks/structured_latency_probes.py groups fmnist-mobilenet
    PYTHONPATH=src:. python benchmarks/structured_latency_probes.py recipe fmnist-resnet 0 0.4 0.6 --steps 150 --lr 1e-3
    PYTHONPATH=src:. python benchmarks/structured_latency_probes.py roundto fmnist-resnet --rounds 15

``groups``: the channel groups StructuredPrune finds (and refuses), with the layers each touches.
``recipe``: every group at each given ratio, fine-tuned (FineTune, ``--steps`` batches; ``--schedule
cosine`` decays the lr to 0), and the validation accuracy (ratio 0: the original fine-tuned alike).
``roundto``: uniform ratios with and without ``round_to=8``, timed at batch 32 against the
original in interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import tightfit
from benchmarks.structured_latency import interleaved, params
from benchmarks.tasks import load_task
from tightfit.operators.structured import StructuredPrune


def pruned(model, task, ratio: float, round_to: int | None):
    op = StructuredPrune(example_input=task.example_input, round_to=round_to)
    op.prepare(model, task.example_input)
    out = copy.deepcopy(model)
    if ratio:
        op.apply_to_model(out, {g: {"ratio": ratio} for g in op.groups})
    return out, op


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("groups", "recipe", "roundto"))
    parser.add_argument("task")
    parser.add_argument("ratios", nargs="*", type=float)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--round-to", type=int, default=None)
    parser.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task)
    model = task.model()
    if args.what == "groups":
        started = time.perf_counter()
        _, op = pruned(model, task, 0.0, None)
        print(json.dumps({"groups": op.groups, "refused": op.refused(), "seconds": time.perf_counter() - started}))
        depthwise = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        covered = {m for members in op.groups.values() for m in members}
        print(
            json.dumps(
                {
                    "groups": len(op.groups),
                    "depthwise": len(depthwise),
                    "depthwise_in_a_group": sum(n in covered for n in depthwise),
                }
            )
        )
    elif args.what == "recipe":
        for ratio in args.ratios:
            candidate, _ = pruned(model, task, ratio, args.round_to)
            torch.manual_seed(0)
            started = time.perf_counter()
            tightfit.FineTune(
                task.train, epochs=1, max_steps=args.steps, lr=args.lr, schedule=args.schedule, optimizer=args.optimizer
            )(candidate)
            train_s = time.perf_counter() - started
            candidate.eval()
            row = {
                "ratio": ratio,
                "steps": args.steps,
                "lr": args.lr,
                "schedule": args.schedule,
                "optimizer": args.optimizer,
                "round_to": args.round_to,
                "params": params(candidate),
                "val": task.metric(candidate),
                "train_s": train_s,
                "load": os.getloadavg()[0],
            }
            print(json.dumps(row), flush=True)
    else:
        models = {"original": model}
        for round_to in (None, 8):
            for ratio in args.ratios or (0.25, 0.4, 0.5):
                models[f"round_to={round_to} ratio={ratio}"] = pruned(model, task, ratio, round_to)[0]
        for name, row in interleaved(models, task.example_input, args.rounds, 3).items():
            print(json.dumps({"model": name, "params": params(models[name]), **row}))
        print(json.dumps({"load": os.getloadavg()}))


if __name__ == "__main__":
    main()
