"""What compressing a tied embedding / output head gains: the .tfz of a small randomly initialized
GPT-2 (Hugging Face config, nothing downloaded) with every layer pruned and quantized by one plan,
with and without an entry for the tied ``transformer.wte`` (= ``lm_head``; before tied weights were
compressed, every run left it alone), against the float32 file.

    PYTHONPATH=src python benchmarks/tied_weights.py

Sizes only (no timing). The settings are fixed (sparsity 0.5, 4 bits), not searched; random
weights, so the figure is about bytes, not accuracy.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import tightfit
from tightfit.export.artifact import size_bytes
from tightfit.operators import Compose, Plan, Prune, Quantize


def _bytes(model, plan) -> int:
    return size_bytes(tightfit.apply(plan, model), plan)


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=2000, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    analysis = tightfit.analyze(model)
    strategy = Compose([Prune(), Quantize()])
    settings = {"prune": {"sparsity": 0.5}, "quantize": {"bits": 4}}
    with_tied = {layer.name: settings for layer in analysis.layers}
    without_tied = {name: s for name, s in with_tied.items() if not analysis.layer(name).tied}
    plain = _bytes(model, Plan.from_strategy(strategy, {}))
    for label, layers in (("tied weight left alone", without_tied), ("tied weight compressed", with_tied)):
        size = _bytes(model, Plan.from_strategy(strategy, layers))
        print(f"{label:24s} {size:>9,d} bytes  {plain / size:5.2f}x smaller than float32 ({plain:,d})")
    tied = [(layer.name, layer.tied, layer.weight_params) for layer in analysis.layers if layer.tied]
    print(f"tied: {tied}; weight params of all layers {analysis.weight_params:,d}")


if __name__ == "__main__":
    main()
