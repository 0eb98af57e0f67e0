"""Why Wanda loses to magnitude pruning on the CNN tasks (docs/calibration.md, issue 17): the same
50% pruning with the score and the comparison group varied one at a time, no repair.

Scores: ``magnitude`` |w|; ``wanda-std`` |w| x the standard deviation of x_j (its norm about its
mean); ``wanda`` |w| x ||x_j|| (x_j: an unfolded input column, its root summed
square over the calibration images and positions, as tightfit's Wanda); ``+bn``: either times the
|gamma / sqrt(var + eps)| of the BatchNorm that follows the convolution (the weight's scale in the
block's output). Groups: ``row`` (each output channel loses half its weights, Wanda's) or
``layer`` (half of the layer's weights, below one threshold, tightfit's magnitude). Layers are
pruned in order, each one's inputs read from the model with the earlier layers already pruned, as
``tightfit.compress_once`` does; the first two arms reproduce its rows in docs/calibration.md.
``--one-layer`` also prunes one layer at a time (the others dense) with magnitude/layer and
wanda/row, to show which layers carry the difference.

    nice -n 10 env PYTHONPATH=src:. python benchmarks/wanda_conv.py --task fmnist-resnet --out docs/results/wanda_conv_fmnist-resnet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrated_tasks import model_inputs  # noqa: E402
from benchmarks.tasks import load_task  # noqa: E402

ARMS = [
    ("magnitude", "layer"),
    ("wanda", "row"),
    ("magnitude", "row"),
    ("wanda", "layer"),
    ("magnitude+bn", "layer"),
    ("wanda+bn", "layer"),
    ("wanda-std", "row"),
]


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """|gamma / sqrt(var + eps)| of the BatchNorm right after each convolution (module order)."""
    out, mods = {}, list(model.named_modules())
    for (name, m), (_, nxt) in zip(mods, mods[1:]):
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels:
            out[name] = (nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)).abs().detach()
    return out


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of its matrix's columns: ``(samples x positions, columns)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.groups != 1:
        raise SystemExit("grouped convolutions (depthwise) are not handled by this script")
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def input_square_sums(
    model: nn.Module, module: nn.Module, batches: list[torch.Tensor], centred: bool = False
) -> torch.Tensor:
    """Summed squares of each input column; ``centred``: about the column's mean (n x variance)."""
    total: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    count = [0]

    def hook(_m, args, _out):
        cols = input_columns(module, args[0]).double()
        total.append(cols.pow(2).sum(0))
        sums.append(cols.sum(0))
        count[0] += cols.shape[0]

    run_hooked(model, module, hook, batches)
    sq = torch.stack(total).sum(0)
    if centred:
        sq = sq - torch.stack(sums).sum(0).pow(2) / count[0]
    return sq.clamp(min=0).float()


def run_hooked(model: nn.Module, module: nn.Module, hook, batches: list[torch.Tensor]) -> None:
    """Run ``batches`` through ``model`` with ``hook`` on ``module``'s forward, removed afterwards."""
    handle = module.register_forward_hook(hook)
    try:
        for b in batches:
            model(b)
    finally:
        handle.remove()


def mask(score: torch.Tensor, group: str, sparsity: float = 0.5) -> torch.Tensor:
    if group == "row":
        k = int(round(sparsity * score.shape[1]))
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return torch.ones_like(score).scatter_(1, idx, 0.0)
    k = int(round(sparsity * score.numel()))
    idx = torch.topk(score.flatten(), k, largest=False).indices
    return torch.ones_like(score).flatten().scatter_(0, idx, 0.0).view_as(score)


@torch.no_grad()
def output_error(
    model: nn.Module, module: nn.Module, delta: torch.Tensor, batches: list[torch.Tensor]
) -> dict[str, float]:
    """The error the pruned weights add to this layer's output (before its BatchNorm), on the
    calibration inputs: ``relative`` = ||dY||_F / ||Y||_F; ``mean_share`` = the part of ||dY||^2
    that is a per-channel constant shift (what re-estimating BatchNorm statistics removes)."""
    acc = {"dy_sum": 0.0, "dy_sq": 0.0, "y_sq": 0.0, "n": 0}
    w = module.weight.reshape(module.weight.shape[0], -1)

    def hook(_m, args, _out):
        x = input_columns(module, args[0]).double()
        dy, y = x @ delta.double().T, x @ w.double().T
        acc["dy_sum"] = acc["dy_sum"] + dy.sum(0)
        acc["dy_sq"] += float(dy.pow(2).sum())
        acc["y_sq"] += float(y.pow(2).sum())
        acc["n"] += dy.shape[0]

    run_hooked(model, module, hook, batches)
    mean_sq = float((acc["dy_sum"] / acc["n"]).pow(2).sum()) * acc["n"]
    return {"relative": (acc["dy_sq"] / acc["y_sq"]) ** 0.5, "mean_share": mean_sq / max(acc["dy_sq"], 1e-30)}


@torch.no_grad()
def prune(
    model: nn.Module,
    arm: tuple[str, str],
    batches: list[torch.Tensor],
    only: str | None = None,
    skip: tuple[str, ...] = (),
    errors: dict[str, dict[str, float]] | None = None,
) -> nn.Module:
    score_name, group = arm
    model = copy.deepcopy(model).eval()
    scales = bn_scales(model)
    for name, m in prunable(model):
        if (only is not None and name != only) or name in skip:
            continue
        w = m.weight.reshape(m.weight.shape[0], -1)
        score = w.abs()
        if score_name.startswith("wanda"):
            centred = score_name.startswith("wanda-std")
            score = score * input_square_sums(model, m, batches, centred).sqrt()[None, :]
        if score_name.endswith("+bn") and name in scales:
            score = score * scales[name][:, None]
        keep = mask(score, group).view_as(m.weight)
        if errors is not None:
            errors[name] = output_error(model, m, (m.weight * (1 - keep)).reshape(w.shape), batches)
        m.weight.mul_(keep)
    return model


@torch.no_grad()
def channel_errors(model: nn.Module, pruned: nn.Module, name: str, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Per output channel of layer ``name``: the pruned layer's output error on the calibration
    inputs in units of the following BatchNorm's running std (what the network sees after BN),
    and the fraction of the channel's weights removed."""
    m, p = dict(model.named_modules())[name], dict(pruned.named_modules())[name]
    x = torch.cat([input_columns(m, _layer_input(model, m, b)) for b in batches]).double()
    delta = (m.weight - p.weight).reshape(m.weight.shape[0], -1).double()
    err = (x @ delta.T).pow(2).mean(0).sqrt()
    bn = {n: b for (n0, _), (n, b) in zip(list(model.named_modules()), list(model.named_modules())[1:]) if n0 == name}
    sigma = next(iter(bn.values())).running_var.double().add(1e-5).sqrt() if bn else torch.ones_like(err)
    rel = (err / sigma).float()
    removed = (p.weight == 0).reshape(p.weight.shape[0], -1).float().mean(1)
    return {
        "error_in_bn_sigma": [round(float(v), 4) for v in rel],
        "removed_fraction": [round(float(v), 4) for v in removed],
        "median": float(rel.median()),
        "max": float(rel.max()),
        "channels_over_1_sigma": int((rel > 1).sum()),
    }


def _layer_input(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _o: got.append(args[0]))
    try:
        model(batch)
    finally:
        handle.remove()
    return got[0]


def accuracy(model: nn.Module, loader: Any, limit: int | None) -> float:
    right = seen = 0
    with torch.no_grad():
        for x, y in loader:
            if limit is not None and seen >= limit:
                break
            right += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return right / seen


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fmnist-resnet")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--one-layer", action="store_true", help="also prune one layer at a time")
    ap.add_argument("--one-layer-images", type=int, default=2000, help="test images for the one-layer rows")
    ap.add_argument("--errors", action="store_true", help="record each layer's output error (calibration inputs)")
    ap.add_argument("--skip", nargs="+", default=[], help="leave these layers dense (e.g. stem.0)")
    ap.add_argument("--arms", nargs="+", help="only these arms, as score/group (e.g. wanda/row)")
    ap.add_argument("--channels", help="only print per-channel errors of this layer for each arm (no test)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task)
    model = task.model().eval()
    batches = model_inputs(task.calibration, args.calibration)
    if args.channels:
        out = {}
        for arm in [a for a in ARMS if not args.arms or f"{a[0]}/{a[1]}" in args.arms]:
            e = channel_errors(model, prune(model, arm, batches, only=args.channels), args.channels, batches)
            out[f"{arm[0]}/{arm[1]}"] = e
            print(
                f"  {arm[0]}/{arm[1]}: {args.channels} error in BN sigma: median {e['median']:.3f}, max "
                f"{e['max']:.3f}, channels over 1 sigma {e['channels_over_1_sigma']}; removed per channel "
                f"{sorted(e['removed_fraction'])}",
                flush=True,
            )
        if args.out:
            args.out.write_text(json.dumps({"task": args.task, "layer": args.channels, "arms": out}, indent=1))
        return
    base = accuracy(model, task.test, None)
    record: dict[str, Any] = {"task": args.task, "float32_test": base, "skip": args.skip, "arms": [], "one_layer": []}
    print(f"{args.task}: float32 test {base:.4f}", flush=True)
    for arm in [a for a in ARMS if not args.arms or f"{a[0]}/{a[1]}" in args.arms]:
        t0 = time.perf_counter()
        errors: dict[str, dict[str, float]] = {}
        acc = accuracy(
            prune(model, arm, batches, skip=tuple(args.skip), errors=errors if args.errors else None), task.test, None
        )
        seconds = round(time.perf_counter() - t0, 1)
        record["arms"].append({"score": arm[0], "group": arm[1], "test": acc, "seconds": seconds, "errors": errors})
        print(f"  {arm[0]:13s} per {arm[1]:5s}: test {acc:.4f} (loss {100 * (base - acc):+.2f} points)", flush=True)
        for name, e in errors.items():
            print(f"    {name:24s} relative output error {e['relative']:.3f}, mean shift share {e['mean_share']:.2f}")
    if args.one_layer:
        base_sub = accuracy(model, task.test, args.one_layer_images)
        record["one_layer_base"] = base_sub
        for name, _ in prunable(model):
            row = {"layer": name}
            for arm in (("magnitude", "layer"), ("wanda", "row")):
                row[f"{arm[0]}/{arm[1]}"] = accuracy(
                    prune(model, arm, batches, only=name), task.test, args.one_layer_images
                )
            record["one_layer"].append(row)
            print(f"  one layer {name}: {row}", flush=True)
    record["load_average"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
