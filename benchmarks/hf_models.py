"""Models from another library, never seen by tightfit's tests: tiny Hugging Face transformers
built from their configs (random weights; nothing is downloaded), each compressed by every
operator with a label-free metric (cosine similarity of the logits to the original's), budget 3.
What is reported: did the run finish, did it find a feasible plan, the file-size ratio, how many
modules were left alone, and whether the saved file reloads (``tightfit.load(path, model=fresh)``)
to the same metric.

    .venv/bin/pip install -c constraints.txt -e '.[hf]'   # transformers: not a dependency of tightfit itself
    PYTHONPATH=src python benchmarks/hf_models.py [default|structured|lowrank|int8 ...] [bert|gpt2|...]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import torch

import tightfit


def models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
        ViTConfig,
        ViTForImageClassification,
    )

    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    text = dict(input_ids=ids, attention_mask=mask)
    yield (
        "bert",
        BertForSequenceClassification(
            BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        ),
        text,
    )
    yield (
        "gpt2",
        GPT2LMHeadModel(
            GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
        ),
        dict(input_ids=ids),
    )
    yield (
        "distilbert",
        DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        ),
        text,
    )
    yield (
        "t5",
        T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
        dict(input_ids=ids, decoder_input_ids=ids),
    )
    yield (
        "vit",
        ViTForImageClassification(
            ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        ),
        dict(pixel_values=torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
    )
    yield (
        "llama",
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        dict(input_ids=ids),
    )


def logits(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


STRATEGIES = {
    "default": lambda: None,  # Prune + Quantize
    "structured": lambda: tightfit.StructuredPrune(ratio=(0.0, 0.5), trace_timeout=20),
    "lowrank": lambda: tightfit.LowRank(),
    "int8": lambda: tightfit.Int8(),
}


def main(argv: list[str]) -> None:
    torch.manual_seed(0)
    chosen = [a for a in argv if a in STRATEGIES] or list(STRATEGIES)
    only = [a for a in argv if a not in STRATEGIES]
    print("| model | strategy | outcome | feasible | size ratio | left alone | reload metric = search metric | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, inputs in models():
        if only and name not in only:
            continue
        model.eval()
        with torch.no_grad():
            reference = logits(model, inputs)

        def metric(m, inputs=inputs, reference=reference):
            with torch.no_grad():
                out = logits(m, inputs)
            return float(torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).mean())

        fresh = copy.deepcopy(model)
        for strategy_name in chosen:
            started = time.perf_counter()
            strategy = STRATEGIES[strategy_name]()
            arguments = dict(
                evaluate=metric,
                constraint=tightfit.MaxDrop(0.05),
                budget=3,
                example_input=inputs,
                search="random",
                seed=0,
            )
            if strategy is not None:
                arguments["strategy"] = strategy
            with tempfile.TemporaryDirectory() as run_dir:
                try:
                    result = tightfit.compress(model, run_dir=run_dir, **arguments)
                except tightfit.errors.TightfitError as exc:  # a clear refusal before any trial
                    print(
                        f"| {name} | {strategy_name} | refused: {type(exc).__name__}: {str(exc)[:90]}... | | | | | "
                        f"{time.perf_counter() - started:.1f} |",
                        flush=True,
                    )
                    continue
                reload = "-"
                if result.feasible:
                    loaded = tightfit.load(f"{run_dir}/model.tfz", model=copy.deepcopy(fresh))
                    reload = (
                        "yes"
                        if abs(metric(loaded) - result.metric) < 1e-5
                        else f"no ({metric(loaded):.5f} vs {result.metric:.5f})"
                    )
                failed = sum(t.state == "FAIL" for t in result.trials)
                outcome = "finished" + (f", {failed} failed trials" if failed else "")
                print(
                    f"| {name} | {strategy_name} | {outcome} | {result.feasible} | {result.compression_ratio:.2f} | "
                    f"{len(result.left_alone)} | {reload} | {time.perf_counter() - started:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
