"""Smoke figures for the calibrated operators (issue 17): metric loss without any training of
round-to-nearest (per channel, group 128) against GPTQ at 4 and 3 bits, and of magnitude against
Wanda and SparseGPT pruning at 50% and 2:4, on two small models trained here:

- ``mnist1d_mlp``: the search benchmark's mnist1d MLP (40-200-200-10), test accuracy (1000 samples);
- ``tiny_gpt2``: a GPT-2 built from its config (2 blocks, width 128, vocabulary 128; nothing is
  downloaded), trained briefly on a synthetic language (a sparse random bigram chain whose tokens
  are copied from 8 positions back a third of the time), test cross-entropy in nats. Only the
  blocks' layers are compressed (``layers=["transformer.h.*"]``): the embeddings (tied with the
  head) stay float32, as GPTQ setups usually keep them.

Calibration: 256 training samples; the metric is on the test split. Every row is one
``tightfit.compress_once`` call (repair: BatchNorm re-estimation, a no-op here: no BatchNorm).

    nice -n 10 env PYTHONPATH=src python benchmarks/calibration.py --out docs/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import tightfit  # noqa: E402
from tightfit import Prune, Quantize  # noqa: E402
from tightfit.export.artifact import size_bytes  # noqa: E402

SETTINGS = [
    ("RTN per channel, 4 bit", lambda layers: Quantize(4, layers=layers)),
    ("RTN group 128, 4 bit", lambda layers: Quantize(4, group_size=128, layers=layers)),
    ("GPTQ group 128, 4 bit", lambda layers: Quantize(4, method="gptq", group_size=128, layers=layers)),
    (
        "GPTQ group 128 act-order, 4 bit",
        lambda layers: Quantize(4, method="gptq", group_size=128, act_order=True, layers=layers),
    ),
    ("RTN per channel, 3 bit", lambda layers: Quantize(3, layers=layers)),
    ("RTN group 128, 3 bit", lambda layers: Quantize(3, group_size=128, layers=layers)),
    ("GPTQ group 128, 3 bit", lambda layers: Quantize(3, method="gptq", group_size=128, layers=layers)),
    (
        "GPTQ group 128 act-order, 3 bit",
        lambda layers: Quantize(3, method="gptq", group_size=128, act_order=True, layers=layers),
    ),
    ("magnitude 50%", lambda layers: Prune(0.5, layers=layers)),
    ("Wanda 50%", lambda layers: Prune(0.5, method="wanda", layers=layers)),
    ("SparseGPT 50%", lambda layers: Prune(0.5, method="sparsegpt", layers=layers)),
    ("magnitude 2:4", lambda layers: Prune(pattern="2:4", layers=layers)),
    ("Wanda 2:4", lambda layers: Prune(pattern="2:4", method="wanda", layers=layers)),
    ("SparseGPT 2:4", lambda layers: Prune(pattern="2:4", method="sparsegpt", layers=layers)),
]


def synthetic_language(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a sparse random bigram chain (4 likely successors per token) with copies."""
    g = torch.Generator().manual_seed(1234)  # the language is fixed; ``seed`` draws the samples
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    weights = torch.tensor([0.55, 0.25, 0.15, 0.05])
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        nxt = successors[out[:, t - 1], torch.multinomial(weights, n, replacement=True, generator=g)]
        if t >= 8:
            copy = torch.rand(n, generator=g) < 1 / 3
            nxt = torch.where(copy, out[:, t - 8], nxt)
        out[:, t] = nxt
    return out


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model = GPT2LMHeadModel(config)
    train_x = synthetic_language(8192, 64, 128, seed=1)
    test_x = synthetic_language(512, 64, 128, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for batch in train_x.split(32):  # one epoch, 256 steps
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()

    def metric(m: nn.Module) -> float:  # test cross-entropy (nats), lower is better
        with torch.no_grad():
            return float(sum(m(input_ids=b, labels=b).loss for b in test_x.split(128)) / len(test_x.split(128)))

    calibration = [{"input_ids": b} for b in train_x[:256].split(64)]
    return model, metric, calibration, ["transformer.h.*"], "test cross-entropy (nats, lower is better)"


def mnist1d():
    from search_tasks import accuracy, task

    t = task("mnist1d_mlp")
    calibration = list(t.split.x_train[:256].split(64))
    return t.model, (lambda m: accuracy(m, t.split.x_test, t.split.y_test)), calibration, None, "test accuracy"


def run(name: str) -> dict:
    start = time.perf_counter()
    model, metric, calibration, layers, what = {"mnist1d_mlp": mnist1d, "tiny_gpt2": tiny_gpt2}[name]()
    rows = [{"setting": "float32", "metric": metric(model), "bytes": size_bytes(model)}]
    print(
        f"{name}: trained in {time.perf_counter() - start:.0f} s; float32 {what}: {rows[0]['metric']:.4f}", flush=True
    )
    for label, make in SETTINGS:
        strategy = make(layers)
        t0 = time.perf_counter()
        result = tightfit.compress_once(
            model, strategy, calibration=calibration if strategy.needs_calibration() else None
        )
        seconds = time.perf_counter() - t0
        row = {
            "setting": label,
            "metric": metric(result.model),
            "bytes": size_bytes(result.model, result.plan),
            "seconds": round(seconds, 2),
            "calibration_passes": result.calibration_passes,
            "uncalibrated": result.uncalibrated,
        }
        rows.append(row)
        print(
            f"  {label:34s} {row['metric']:.4f}  {row['bytes']:>8d} B  {seconds:6.2f} s  passes {row['calibration_passes']}",
            flush=True,
        )
    return {"model": name, "metric": what, "rows": rows}


def markdown(records: list[dict]) -> str:
    """One table per model: the metric, its loss against float32 (positive: worse), file bytes."""
    out = []
    for record in records:
        rows = record["rows"]
        base = rows[0]["metric"]
        sign = 1 if "lower is better" in record["metric"] else -1
        out += [
            f"**{record['model']}** ({record['metric']}; float32 {base:.4f}, {rows[0]['bytes']} B)",
            "",
            "| setting | metric | loss vs float32 | file bytes | calibration s (passes) |",
            "|---|---|---|---|---|",
        ]
        for row in rows[1:]:
            cost = f"{row['seconds']:.1f} ({row['calibration_passes']})" if row["calibration_passes"] else "-"
            out.append(
                f"| {row['setting']} | {row['metric']:.4f} | {sign * (row['metric'] - base):+.4f} | {row['bytes']} | {cost} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mnist1d_mlp", "tiny_gpt2"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", nargs="+", type=Path, help="only print the tables of these JSON records")
    args = parser.parse_args()
    if args.table:
        print(markdown([r for path in args.table for r in json.loads(path.read_text())]))
        return
    torch.set_num_threads(1)
    records = [run(name) for name in args.models]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    print(markdown(records))


if __name__ == "__main__":
    main()
