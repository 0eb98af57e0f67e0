"""What removing whole attention heads does to a small transformer: parameters, bytes of the saved
file and CPU latency, for StructuredPrune's head_ratio applied to every layer (no search, no
training: the plan alone). Two nn.TransformerEncoderLayer (d_model 128, 8 heads, feed-forward 512),
batch 8 x 64 tokens, keyword-argument forward, one thread; timed with and without a padding mask.
The original can take PyTorch's fused attention fast path (inference mode, packed q/k/v weights);
a block that lost heads is a SplitQKVAttention, which cannot. The last row of each setting keeps
every head but splits q/k/v, to show what the split alone costs or saves.

    flock /tmp/tightfit-timing.lock env PYTHONPATH=src python benchmarks/heads.py   # rows: docs/results/heads.txt
"""

import torch
from torch import nn

import tightfit
from tightfit.export.artifact import size_bytes
from tightfit.operators import Compose, Plan, StructuredPrune
from tightfit.operators.heads import split_multihead_attention


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        layer = nn.TransformerEncoderLayer(128, 8, 512, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.classifier = nn.Linear(128, 4)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        return self.classifier(self.enc(self.embed(input_ids), src_key_padding_mask=pad).mean(1))


torch.manual_seed(0)
model = Encoder().eval()
tokens = torch.randint(0, 1000, (8, 64))
op = StructuredPrune(example_input={"input_ids": tokens})
for setting, inputs in (
    ("padding mask", {"input_ids": tokens, "attention_mask": torch.ones(8, 64, dtype=torch.long)}),
    ("no mask", {"input_ids": tokens}),
):
    latency = tightfit.Latency(inputs, threads=1, min_run_time=2.0)
    with torch.no_grad():
        reference = model(**inputs)
    for head_ratio in (0.0, 0.25, 0.5, 0.75):
        layers = {
            f"enc.layers.{i}.self_attn.out_proj": {"structured_prune": {"head_ratio": head_ratio}} for i in range(2)
        }
        plan = Plan.from_strategy(Compose([op]), layers)
        pruned = tightfit.apply(plan, model)
        with torch.no_grad():
            drift = float((pruned(**inputs) - reference).abs().max())
        measured = latency(pruned)
        print(
            f"{setting:12s} head_ratio={head_ratio:.2f} heads={pruned.enc.layers[0].self_attn.num_heads} "
            f"params={sum(p.numel() for p in pruned.parameters())} bytes={size_bytes(pruned, plan)} "
            f"latency_ms={measured.median_ms:.2f} (iqr {measured.iqr_ms:.2f}) max_output_change={drift:.3f}",
            flush=True,
        )
    split = tightfit.apply(Plan.from_strategy(Compose([op]), {}), model)
    for i in range(2):
        split_multihead_attention(split, f"enc.layers.{i}.self_attn")
    measured = latency(split)
    print(
        f"{setting:12s} split q/k/v, all 8 heads kept: latency_ms={measured.median_ms:.2f} (iqr {measured.iqr_ms:.2f})",
        flush=True,
    )
