"""Structured pruning of whole attention heads: nn.MultiheadAttention (via its split q/k/v form)
and Hugging Face-style attention whose head count is an attribute."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.export.artifact import load_model, to_bytes
from tightfit.measure import analyze
from tightfit.operators import Compose, Plan, Quantize, StructuredPrune, apply
from tightfit.operators.heads import SplitQKVAttention, mask_heads, remove_heads
from tightfit.search.space import build_space

HEADS = "enc.self_attn.out_proj/structured_prune/head_ratio"


class TinyEncoder(nn.Module):
    """d_model 16, 4 heads, called with keyword arguments like a text model."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.enc = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.classifier = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        return self.classifier(self.enc(self.embed(input_ids), src_key_padding_mask=pad).mean(dim=1))


def _inputs():
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # a padded sequence, so the key padding mask matters
    return {
        "input_ids": torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(1)),
        "attention_mask": mask,
    }


def _model():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _plan(op, head_ratio):
    return Plan.from_strategy(
        Compose([op]), {"enc.self_attn.out_proj": {"structured_prune": {"head_ratio": head_ratio}}}
    )


def test_transformer_layer_searches_a_head_ratio_and_removing_two_heads_of_four_works(tmp_path):
    model, inputs = _model(), _inputs()
    op = StructuredPrune()
    op.prepare(model, inputs)
    space = build_space(Compose([op]), analyze(model))
    assert HEADS in space.keys and op.head_blocks == ["enc.self_attn.out_proj"]
    dimension = next(d for d in space.dimensions if d.key == HEADS)
    assert (dimension.hyperparameter.low, dimension.hyperparameter.high) == (0.0, 0.75)

    with torch.no_grad():
        reference = model(**inputs)
        assert torch.equal(apply(_plan(op, 0.0), model)(**inputs), reference)  # the identity changes nothing

    plan = _plan(op, 0.5)
    pruned = apply(plan, model)
    attention = pruned.enc.self_attn
    assert isinstance(attention, SplitQKVAttention) and attention.num_heads == 2 and attention.head_dim == 4
    assert attention.q_proj.out_features == attention.v_proj.out_features == attention.out_proj.in_features == 8
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters()) - 2 * 4 * (
        3 * 17 + 16
    )
    with torch.no_grad():
        out = pruned(**inputs)
        # exactly what the original computes with the two dropped heads' values zeroed
        masked = copy.deepcopy(model)
        mask_heads(masked, {"enc.self_attn.out_proj": _removed(model, inputs)})
        assert torch.allclose(out, masked(**inputs), atol=1e-5)
        assert not torch.allclose(out, reference, atol=1e-3)

    data = to_bytes(pruned, plan)
    for loaded in (load_model(io.BytesIO(data), model=TinyEncoder()),):
        assert loaded.enc.self_attn.num_heads == 2
        with torch.no_grad():
            assert torch.equal(loaded(**inputs), out)


def _removed(model, inputs):
    return remove_heads(copy.deepcopy(model), {"enc.self_attn.out_proj": 0.5}, inputs)["enc.self_attn.out_proj"]


def test_compress_searches_heads_and_the_run_directory_reloads(tmp_path):
    model, inputs = _model(), _inputs()
    with torch.no_grad():
        reference = model(**inputs)

    @torch.no_grad()
    def evaluate(m):
        return -float(((m(**inputs) - reference) ** 2).mean())

    result = tightfit.compress(
        model,
        evaluate=evaluate,
        constraint=tightfit.MaxDrop(10.0),
        strategy=Compose([StructuredPrune(ratio=0.0, head_ratio=(0.25, 0.75)), Quantize(bits=8)]),
        budget=2,
        search="random",
        example_input=inputs,
        run_dir=tmp_path / "run",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    assert result.plan.layers["enc.self_attn.out_proj"]["structured_prune"]["head_ratio"] >= 0.25
    assert result.model.enc.self_attn.num_heads < 4
    assert "enc.self_attn" not in {s.name for s in result.left_alone}  # its heads were searched
    saved = tmp_path / "run" / "model.tfz"
    for loaded in (tightfit.load(saved, model=TinyEncoder()),):
        with torch.no_grad():
            assert torch.equal(loaded(**inputs), result.model(**inputs))


def test_split_attention_computes_what_multihead_attention_does():
    torch.manual_seed(0)
    key_padding = torch.zeros(2, 7, dtype=torch.bool)
    key_padding[0, 5:] = True
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
        split = SplitQKVAttention.from_multihead_attention(mha)
        q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        kv = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
        for options in (
            {},
            {"key_padding_mask": key_padding},
            {"attn_mask": torch.randn(5, 7)},
            {"attn_mask": torch.rand(8, 5, 7) > 0.8, "need_weights": False},
            {"average_attn_weights": False},
        ):
            expected, got = mha(q, kv, kv, **options), split(q, kv, kv, **options)
            assert torch.allclose(got[0], expected[0], atol=1e-5), options
            assert (got[1] is None) == (expected[1] is None)
            assert got[1] is None or torch.allclose(got[1], expected[1], atol=1e-5), options
    unbatched = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 16)
    assert torch.allclose(
        SplitQKVAttention.from_multihead_attention(unbatched)(x, x, x)[0], unbatched(x, x, x)[0], atol=1e-5
    )


def test_a_stack_of_layers_with_a_padding_mask_runs_after_pruning_in_inference_mode():
    """nn.TransformerEncoder's nested-tensor fast path reads packed weights: it must be turned off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    inputs = {"src": x, "src_key_padding_mask": pad}
    op = StructuredPrune()
    op.prepare(model, inputs)  # its check compares both on the plain path, which fills padded positions
    assert op.head_blocks == ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]
    pruned = copy.deepcopy(model)
    removed = remove_heads(pruned, {"layers.0.self_attn.out_proj": 0.5, "layers.1.self_attn.out_proj": 0.25}, inputs)
    masked = copy.deepcopy(model)
    mask_heads(masked, removed)
    with torch.no_grad():  # (the fast path outputs zeros at padded positions, the plain path does not)
        assert torch.allclose(pruned(**inputs)[~pad], masked(**inputs)[~pad], atol=1e-5)
    assert [layer.self_attn.num_heads for layer in pruned.layers] == [2, 3]


class BertLikeSelfAttention(nn.Module):
    """Hugging Face's layout: query/key/value Linears, the head count and sizes as attributes."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, dim // heads, dim
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):
            return t.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        h = torch.softmax(q @ k.transpose(-1, -2) / self.attention_head_size**0.5, dim=-1) @ v
        return h.transpose(1, 2).reshape(b, n, self.all_head_size)


class BertLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attention = BertLikeSelfAttention()
        self.output = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        h = x + self.output(self.self_attention(x))
        return self.classifier(h.mean(dim=1))


def test_hugging_face_style_attention_loses_heads_and_its_head_count_follows():
    torch.manual_seed(0)
    model, x = BertLike().eval(), torch.randn(2, 5, 16)
    op = StructuredPrune()
    op.prepare(model, x)
    assert op.head_blocks == ["self_attention.value"]  # the leader of the q/k/v group
    assert "self_attention.value" not in op.refused()
    plan = Plan.from_strategy(Compose([op]), {"self_attention.value": {"structured_prune": {"head_ratio": 0.5}}})
    pruned = apply(plan, model)
    attention = pruned.self_attention
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (2, 8, 8)
    assert pruned.output.in_features == 8
    loaded = load_model(io.BytesIO(to_bytes(pruned, plan)), model=BertLike())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


class HeadsFromInputWidth(nn.Module):
    """Works its head size out of the input's width: removing heads cannot be done by an attribute."""

    def __init__(self, dim=16):
        super().__init__()
        self.num_heads = 4
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        h = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2), dim=-1) @ split(self.v(x))
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HeadsFromInputWidth()
        self.biased = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = x + self.attn(x)
        h = h + self.biased(h, h, h, need_weights=False)[0]
        return self.down(torch.relu(self.up(h))).mean(dim=1)


def test_attention_whose_heads_cannot_be_removed_is_left_alone_and_named(tmp_path):
    torch.manual_seed(0)
    model, x = Unsupported().eval(), torch.randn(4, 5, 16)
    op = StructuredPrune()
    op.prepare(model, x)
    assert op.head_blocks == []
    reasons = op.refused()
    assert "add_bias_kv" in reasons["biased.out_proj"]
    assert "attention heads" in reasons[next(n for n in reasons if n.startswith("attn."))]
    with torch.no_grad():
        reference = model(x)
    result = tightfit.compress(
        model,
        evaluate=lambda m: -float(((m(x) - reference) ** 2).mean()),
        constraint=tightfit.MaxDrop(10.0),
        strategy=StructuredPrune(),
        budget=1,
        search="random",
        example_input=x,
    )
    assert all(t.state == "COMPLETE" for t in result.trials)
    left = {s.name for s in result.left_alone}
    assert "biased.out_proj" in left and {"attn.q", "attn.k", "attn.v"} & left
    assert "up" in result.plan.layers


def test_head_ratio_is_checked_where_given():
    with pytest.raises(ConfigError, match="head_ratio"):
        StructuredPrune(head_ratio=1.0)
    model, inputs = _model(), _inputs()
    op = StructuredPrune(head_ratio=0.0)  # attention left as it was
    op.prepare(model, inputs)
    assert op.head_blocks == [] and HEADS not in build_space(Compose([op]), analyze(model)).keys
    with pytest.raises(ConfigError, match="head_ratio"):
        apply(_plan(StructuredPrune(input_spec=op.config()["input_spec"]), 1.0), model)
