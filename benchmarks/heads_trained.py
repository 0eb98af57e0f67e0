"""What removing whole attention heads costs a TRAINED transformer in accuracy (benchmarks/heads.py
measures the same plans on random weights, for size and speed only).

Task: scikit-learn's digits (tightfit.demo.digits_split, no download), each 8x8 image read as 8
tokens (rows) of 8 features. Model: Linear token embedding + learned positional embedding, two
nn.TransformerEncoderLayer (d_model 64, 8 heads, feed-forward 128, batch_first), mean-pool, Linear.
Trained once (Adam, seed 0) and cached in benchmarks/results/.original_heads_digits.pt (gitignored,
as cheap_eval.py's originals are).

(a) fixed plans: head_ratio 0, 0.25, 0.5, 0.75 on both blocks (nothing else pruned), evaluated as
    pruned and after a short tightfit.FineTune; parameters, .tfz bytes and latency (tightfit.Latency,
    1 thread, batch 32, taken while holding /tmp/tightfit-timing.lock).
(b) one tightfit.compress search, strategy=StructuredPrune() (heads and feed-forward channels
    searched), MaxDrop(0.01) on validation accuracy, budget 15, the same fine-tune per trial.

    PYTHONPATH=src nice -n 10 python benchmarks/heads_trained.py --out docs/results/heads_trained.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from timing import timing_lock  # benchmarks/timing.py (this folder is the script's path)
from torch import nn

import tightfit
from tightfit.demo.data import digits_split, train
from tightfit.export.artifact import size_bytes
from tightfit.operators import Compose, Plan, StructuredPrune
from tightfit.operators.heads import split_multihead_attention
from tightfit.pipeline import float32_file_bytes

RESULTS = Path(__file__).parent / "results"
BLOCKS = 2
HEADS = 8


class DigitsTransformer(nn.Module):
    """A flat (N, 64) digit read as 8 tokens of 8 pixels, so the demo's loaders and Accuracy fit."""

    def __init__(self, tokens: int = 8, features: int = 8, d_model: int = 64):
        super().__init__()
        self.tokens, self.features = tokens, features
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.zeros(1, tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, HEADS, 128, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, BLOCKS, enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, self.tokens, self.features)) + self.position
        return self.classifier(self.enc(h).mean(1))


def trained(split) -> tuple[nn.Module, float]:
    """The original, trained once and cached; returns it and the training seconds (0 if cached)."""
    cache = RESULTS / ".original_heads_digits.pt"
    model = DigitsTransformer()
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), 0.0
    torch.manual_seed(0)
    model = DigitsTransformer()
    started = time.perf_counter()
    model = train(model, split, epochs=40, lr=2e-3, seed=0)
    seconds = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model, seconds


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def heads_per_block(model: nn.Module) -> list[int]:
    return [model.enc.layers[i].self_attn.num_heads for i in range(BLOCKS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    split = digits_split(0)
    model, train_s = trained(split)
    val = tightfit.Accuracy(split.loader("val", batch_size=512))
    test = tightfit.Accuracy(split.loader("test", batch_size=512))
    example = split.x_val[:1]
    latency = tightfit.Latency(split.x_val[:32], batch_size=None, threads=1, min_run_time=1.0)

    def finetune() -> tightfit.FineTune:
        return tightfit.FineTune(split.loader("train", shuffle=True), epochs=args.finetune_epochs, lr=1e-3)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(
        f"original: val {val(model):.4f}, test {test(model):.4f}, {params(model):,} parameters"
        + (f", trained in {train_s:.1f} s" if train_s else " (cached weights)")
    )
    say()
    say(f"### (a) fixed plans: head_ratio on both blocks, fine-tune {args.finetune_epochs} epochs (Adam 1e-3)")
    say()
    say(
        "| head_ratio | heads per block | parameters | .tfz bytes | val acc | test acc | val acc, fine-tuned | test acc, fine-tuned | latency ms, 1 thread, batch 32 (IQR) |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    op = StructuredPrune(example_input=example)
    for head_ratio in (0.0, 0.25, 0.5, 0.75):
        layers = {
            f"enc.layers.{i}.self_attn.out_proj": {"structured_prune": {"head_ratio": head_ratio}}
            for i in range(BLOCKS)
        }
        plan = Plan.from_strategy(Compose([op]), layers)
        pruned = tightfit.apply(plan, model).eval()
        row = [val(pruned), test(pruned)]
        with timing_lock():
            measured = latency(pruned)
        tuned = copy.deepcopy(pruned)
        torch.manual_seed(0)
        finetune()(tuned)
        tuned.eval()
        row += [val(tuned), test(tuned)]
        say(
            f"| {head_ratio:g} | {'/'.join(map(str, heads_per_block(pruned)))} | {params(pruned):,} | {size_bytes(tuned, plan):,} | "
            + " | ".join(f"{v:.4f}" for v in row)
            + f" | {measured.median_ms:.3f} ({measured.iqr_ms:.3f}) |"
        )
    # what the split alone costs or saves: the original keeps PyTorch's fused attention path, a
    # pruned block cannot take it
    split_only = copy.deepcopy(model)
    for i in range(BLOCKS):
        split_multihead_attention(split_only, f"enc.layers.{i}.self_attn")
    with timing_lock():
        measured = latency(split_only.eval())
    say(
        f"| 0, q/k/v split | 8/8 | {params(split_only):,} | | {val(split_only):.4f} | {test(split_only):.4f} | | | "
        f"{measured.median_ms:.3f} ({measured.iqr_ms:.3f}) |"
    )
    say()
    say(f"The original as `torch.save(state_dict)` (compress's baseline file): {float32_file_bytes(model):,} bytes.")

    say()
    say(
        f"### (b) compress: StructuredPrune() (heads and channels searched), MaxDrop(0.01), budget {args.budget}, "
        f"fine-tune {args.finetune_epochs} epochs per trial, seed 0"
    )
    say()
    started = time.perf_counter()
    result = tightfit.compress(
        model,
        evaluate=val,
        strategy=StructuredPrune(),
        constraint=tightfit.MaxDrop(0.01),
        finetune=finetune(),
        budget=args.budget,
        example_input=example,
        seed=0,
    )
    wall = time.perf_counter() - started
    say(
        f"feasible: {result.feasible}; val {result.metric:.4f} (original {result.baseline_metric:.4f}); "
        f"test {test(result.model):.4f}; {params(result.model):,} parameters; .tfz {result.size_bytes:,} bytes "
        f"(original {result.baseline_size_bytes:,}); {wall:.0f} s wall"
    )
    if result.plan is not None:
        with timing_lock():
            chosen, original = latency(result.model.eval()), latency(model)
        say(
            f"latency ms (1 thread, batch 32): answer {chosen.median_ms:.3f} (IQR {chosen.iqr_ms:.3f}), "
            f"original {original.median_ms:.3f} (IQR {original.iqr_ms:.3f})"
        )
        say(f"heads per block: {'/'.join(map(str, heads_per_block(result.model)))}")
        say()
        say("| layer (plan entry) | chosen |")
        say("|---|---|")
        for name, ops in result.plan.layers.items():
            say(
                f"| `{name}` | {', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for s in ops.values() for k, v in s.items())} |"
            )
    feasible = [t for t in result.trials if t.feasible]
    say()
    say(
        f"trials: {len(result.trials)}, feasible: {len(feasible)}; left alone: "
        + (", ".join(s.name or f"the model's own {s.type}" for s in result.left_alone) or "none")
    )
    if args.out:
        header = [
            "# Whole attention heads on a trained transformer (digits)",
            "",
            "Written by (model, data and settings: the script's docstring; latencies taken holding "
            "/tmp/tightfit-timing.lock):",
            "",
            f"    PYTHONPATH=src nice -n 10 python benchmarks/heads_trained.py --finetune-epochs {args.finetune_epochs} "
            f"--budget {args.budget} --out {args.out}",
            "",
        ]
        args.out.write_text("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
