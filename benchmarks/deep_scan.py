"""What the sensitivity scan costs on a deep model: a toy MLP of 61 Linear layers (16 wide; 122
search dimensions with the default Prune + Quantize), trials that cost nothing (no fine-tune, 256
procedurally generated samples), `compress` at budget 30 with `search="auto"` (`bo`), with the
scan capped (the default, `MAX_SCAN_PROBES` = 330) and uncapped (every dimension at all 11 levels,
as before the cap).

    PYTHONPATH=src python benchmarks/deep_scan.py
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

import tightfit
from tightfit.search import sensitivity


def run(max_probes: int) -> str:
    sensitivity.MAX_SCAN_PROBES = max_probes
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, 0] > 0).long()
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    layers: list[nn.Module] = []
    for _ in range(60):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 2))
    started = time.perf_counter()
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(loader),
        budget=30,
        seed=0,
        example_input=x[:1],
        constraint=tightfit.MaxDrop(0.05),
    )
    wall = time.perf_counter() - started
    acc = result.accounting
    return (
        f"| {max_probes:,} | {wall:.1f} | {acc.get('probe_wall_s', 0):.1f} | {acc.get('optimizer_wall_s', 0):.1f} | "
        f"{acc.get('val_samples_probes', 0):,} | {result.compression_ratio:.2f}x |"
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("| scan cap (probes) | wall s | probes s | optimizer s | probe samples | answer |")
    print("|---|---|---|---|---|---|")
    for cap in (sensitivity.MAX_SCAN_PROBES, 10**9):
        print(run(cap), flush=True)


if __name__ == "__main__":
    main()
