"""Models no issue names: BatchNorm + skip connections, a transformer with keyword arguments,
metrics other than accuracy. They are compressed where possible, the rest is named, nothing crashes."""

import pytest
import torch
from torch import nn

import tightfit
from tightfit.operators import Compose, Prune, Quantize


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 3)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        h = self.layer(self.embed(input_ids), src_key_padding_mask=pad)
        return self.classifier(self.norm(h).mean(dim=1))


def _fidelity_metric(original, inputs):
    """Negative mean squared error to the original's outputs: a metric with no labels."""
    with torch.no_grad():
        reference = original(**inputs) if isinstance(inputs, dict) else original(inputs)

    def metric(model):
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return -float(((out - reference) ** 2).mean())

    return metric


def test_cnn_with_batchnorm_and_skip_connections(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(16, 3, 8, 8)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        strategy=Compose([Prune(), Quantize(bits=(4, 8))]),
        constraint=tightfit.MaxDrop(0.05),
        budget=4,
        search="random",
        example_input=x[:1],
        run_dir=tmp_path / "run",
    )
    assert len(result.trials) == 4 and all(t.state == "COMPLETE" for t in result.trials)
    compressed_layers = {d for t in result.trials for d in t.plan.layers}
    assert compressed_layers == {"stem.0", "block.0", "block.3", "head"}
    assert {s.type for s in result.left_alone} == {"BatchNorm2d"}
    if result.feasible:
        loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=model)
        assert torch.equal(loaded(x), result.model(x))


def test_transformer_with_embedding_layernorm_attention_and_kwargs(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    inputs = {"input_ids": torch.randint(0, 50, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, inputs),
        strategy=Compose([Prune(sparsity=(0.0, 0.5)), Quantize(bits=(8, 16))]),
        constraint=tightfit.MaxDrop(1.0),
        objective="flops",
        budget=3,
        search="random",
        example_input=inputs,
        run_dir=tmp_path / "run",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    layers = set(result.trials[0].plan.layers)
    assert {"embed", "layer.linear1", "layer.linear2", "layer.self_attn.out_proj", "classifier"} <= layers
    left = {s.name: s.type for s in result.left_alone}
    assert left["norm"] == "LayerNorm" and "embed" not in left
    assert left["layer.self_attn"] == "MultiheadAttention"  # its packed in_proj_weight is not a Linear
    assert result.feasible
    loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=model)
    assert torch.allclose(loaded(**inputs), result.model(**inputs))


class _DictBatches:
    """Training batches of ({"input_ids", "attention_mask"}, labels): how text data usually arrives."""

    def __init__(self, n=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                {
                    "input_ids": torch.randint(0, 50, (8, 12), generator=g),
                    "attention_mask": torch.ones(8, 12, dtype=torch.long),
                },
                torch.randint(0, 3, (8,), generator=g),
            )
            for _ in range(n)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_recoveries_train_unseen_models_inside_the_search(tmp_path):
    from tightfit.recovery import GradualPrune, LearningCompression, PruneSplice

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    inputs = {"input_ids": torch.randint(0, 50, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    loader = _DictBatches()
    for recovery in (
        GradualPrune(loader, epochs=1),
        PruneSplice(loader, epochs=1),
        LearningCompression(loader, epochs=1),
    ):
        result = tightfit.compress(
            model,
            evaluate=_fidelity_metric(model, inputs),
            strategy=Prune(sparsity=(0.2, 0.6)),
            constraint=tightfit.MaxDrop(10.0),
            finetune=recovery,
            budget=2,
            search="random",
            example_input=inputs,
        )
        assert all(t.state == "COMPLETE" for t in result.trials), (recovery, [t.error for t in result.trials])
        assert result.feasible and result.nonzero_ratio > 1.2

    resnet = TinyResNet().eval()
    x = torch.randn(16, 3, 8, 8)
    images = [(x[:8], torch.randint(0, 4, (8,))), (x[8:], torch.randint(0, 4, (8,)))]
    result = tightfit.compress(
        resnet,
        evaluate=_fidelity_metric(resnet, x),
        strategy=Prune(sparsity=(0.3, 0.6)),
        constraint=tightfit.MaxDrop(10.0),
        finetune=GradualPrune(images, epochs=2),
        budget=2,
        search="random",
        example_input=x[:1],
    )
    assert all(t.state == "COMPLETE" for t in result.trials) and result.feasible


class TransposedLinear(nn.Module):
    """A linear layer stored transposed, as Hugging Face's GPT-2 `Conv1D`: not an nn.Linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class HeadsAttention(nn.Module):
    """Self-attention written out: q, k, v Linears whose outputs are reshaped into heads."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        h = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class HandWrittenBlock(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.attn = HeadsAttention(dim)
        self.up = nn.Linear(dim, 32)
        self.down = nn.Linear(32, dim)
        self.proj = TransposedLinear(dim, 3)

    def forward(self, x):
        h = x + self.attn(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.proj(h.mean(dim=1))


def test_a_layer_that_only_holds_a_weight_matrix_is_pruned_and_quantized(tmp_path):
    torch.manual_seed(0)
    model = HandWrittenBlock().eval()
    x = torch.randn(8, 5, 16)
    kinds = {layer.name: layer.kind for layer in tightfit.measure.analyze(model).layers}
    assert kinds["proj"] == "MatrixLayer" and kinds["up"] == "Linear"
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(1.0),
        strategy=Compose([Prune(sparsity=(0.3, 0.6)), Quantize(bits=8)]),
        budget=2,
        search="random",
        example_input=x,
        run_dir=tmp_path / "run",
    )
    assert result.feasible and "proj" in result.plan.layers
    assert float((result.model.proj.weight == 0).float().mean()) >= 0.3
    fresh = HandWrittenBlock()
    loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=fresh)  # no code unpickled
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    # int8 runs a matrix layer as its nn.Linear only once prepare has checked the swap on the model
    assert not tightfit.Int8().supports(tightfit.measure.analyze(model).layer("proj"))


class ScaledByMatrix(nn.Module):
    """Holds only a 2-D weight but does not multiply by it: no Linear equivalent."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.full((n, n), 1.0 / (n * n)))  # sums to 1

    def forward(self, x):
        return x * self.weight.sum()


def test_low_rank_factorizes_a_matrix_layer_that_checks_out_as_affine(tmp_path):
    from tightfit.operators import Plan
    from tightfit.operators.lowrank import linear_equivalent
    from tightfit.operators.matrix import NOT_AFFINE

    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(32, 48), nn.ReLU(), ScaledByMatrix(48), nn.Linear(48, 4)).eval()
    x = torch.randn(16, 32)
    op = tightfit.LowRank(rank_ratio=(0.25, 0.5))
    op.prepare(model, x)
    layers = tightfit.measure.analyze(model)
    assert layers.layer("0").kind == layers.layer("2").kind == "MatrixLayer"
    assert op.supports(layers.layer("0")) and not op.supports(layers.layer("2"))
    assert linear_equivalent(model[2]) is None
    equivalent = linear_equivalent(model[0])  # Conv1D-style: used as x @ W, so the Linear holds W.T
    assert isinstance(equivalent, nn.Linear) and torch.allclose(equivalent(x), model[0](x), atol=1e-6)
    # factorized into two Linears: the best rank-r approximation of W.T
    factored = tightfit.apply(
        Plan.from_strategy(Compose([tightfit.LowRank()]), {"0": {"low_rank": {"rank_ratio": 0.25}}}), model
    )
    first, second = factored[0]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and first.out_features == 8
    u, s, vh = torch.linalg.svd(model[0].weight.detach().t().double())
    best = (u[:, :8] * s[:8]) @ vh[:8]
    assert torch.allclose((second.weight @ first.weight).double(), best, atol=1e-5)
    # a search, and the file reloaded into a fresh model (the factorization replayed on it)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=op,
        budget=2,
        search="random",
        example_input=x,
        run_dir=tmp_path / "run",
    )
    assert result.feasible and "0" in result.plan.layers and "2" not in result.plan.layers
    assert {s.name: s.reason for s in result.left_alone}["2"] == NOT_AFFINE  # named, with the reason
    fresh = nn.Sequential(TransposedLinear(32, 48), nn.ReLU(), ScaledByMatrix(48), nn.Linear(48, 4))
    loaded = tightfit.load(tmp_path / "run" / "model.tfz", model=fresh)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-5)


class ReadsItsChildsWeight(nn.Module):
    """Calls its matrix layer, and also reads that layer's weight in its stored layout."""

    def __init__(self, n):
        super().__init__()
        self.proj = TransposedLinear(n, n)

    def forward(self, x):
        return self.proj(x) + x @ self.proj.weight


class NoisyOutput(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.proj = TransposedLinear(n, n)

    def forward(self, x):
        return self.proj(x) + torch.randn_like(x)


def test_int8_runs_a_matrix_layer_that_checks_out_as_affine_as_a_linear(tmp_path):
    from tightfit.export import read_manifest
    from tightfit.operators import Int8, Int8Weights, Plan, WeightMask, int8_layers
    from tightfit.operators.matrix import NOT_AFFINE

    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(32, 48), nn.ReLU(), ScaledByMatrix(48), nn.Linear(48, 4)).eval()
    x = torch.randn(16, 32)
    op = Int8()
    op.prepare(model, x)
    layers = tightfit.measure.analyze(model)
    assert op.supports(layers.layer("0")) and op.supports(layers.layer("3")) and not op.supports(layers.layer("2"))
    assert op.refused() == {"2": NOT_AFFINE}
    # a plan swaps the Conv1D-style layer for its nn.Linear, then puts its weight on the int8 grid
    plan = Plan.from_strategy(Compose([Prune(), Int8()]), {"0": {"prune": {"sparsity": 0.5}, "int8": {"int8": True}}})
    marked = tightfit.apply(plan, model)
    assert isinstance(marked[0], nn.Linear) and int8_layers(marked) == ["0"]
    assert [type(step) for step in marked[0].parametrizations["weight"]] == [WeightMask, Int8Weights]
    float_only = tightfit.apply(Plan.from_strategy(Compose([Int8()]), {"0": {"int8": {"int8": False}}}), model)
    assert isinstance(float_only[0], TransposedLinear)  # a layer kept in float is not touched
    # the search: int8 for the matrix layer and the Linear; the other matrix layer left alone, named
    run_dir = tmp_path / "run"
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(1.0),
        strategy=Int8(choices=(True,)),
        budget=1,
        example_input=x,
        run_dir=run_dir,
    )
    assert result.feasible and sorted(result.plan.layers) == ["0", "3"]
    assert {s.name: s.reason for s in result.left_alone}["2"] == NOT_AFFINE
    with torch.no_grad():
        reference, got = model(x), result.model(x)
    assert (
        0 < float((got - reference).abs().max()) < 0.02 * float(reference.abs().max())
    )  # int8 weights: close, not equal
    manifest = read_manifest(run_dir / "model.tfz")
    stored = {t["name"]: t for t in manifest["tensors"]}
    assert stored["0.weight"]["kind"] == "int" and stored["0.weight"]["bits"] == 8
    fresh = nn.Sequential(TransposedLinear(32, 48), nn.ReLU(), ScaledByMatrix(48), nn.Linear(48, 4))
    for loaded in (tightfit.load(run_dir / "model.tfz", model=fresh),):
        assert type(loaded[0]) is nn.Linear and torch.equal(loaded(x), got)
    assert isinstance(fresh[0], TransposedLinear)  # the given model is copied, not changed
    # a parent that reads the weight in its stored layout would change: left alone, and why
    reader = ReadsItsChildsWeight(8).eval()
    op.prepare(reader, torch.randn(4, 8))
    assert "other than through its forward" in op.refused()["proj"]
    op.prepare(reader, None)
    assert "example_input" in op.refused()["proj"]
    noisy = NoisyOutput(8).eval()  # nothing to compare a swap with
    op.prepare(noisy, torch.randn(4, 8))
    assert "changes from call to call" in op.refused()["proj"]


@pytest.mark.onnx
def test_int8_matrix_layer_is_int8_in_the_onnx_export(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from tightfit.export import export_run
    from tightfit.operators import Int8

    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(32, 64), nn.ReLU(), TransposedLinear(64, 4)).eval()
    x = torch.randn(16, 32)
    latency = tightfit.Latency(x, threads=1, min_run_time=0.01, runtime="onnxruntime")
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(1.0),
        strategy=Int8(choices=(True,)),
        budget=1,
        example_input=x,
        objective="latency",
        latency=latency,
        run_dir=tmp_path / "run",
    )
    assert sorted(result.plan.layers) == ["0", "2"] and result.feasible
    report = export_run(tmp_path / "run", model=model, format="onnx", threads=1)
    assert report.int8 == "dynamic" and report.int8_layers == ["0", "2"]
    ops = [node.op_type for node in onnx.load(report.path).graph.node]
    assert ops.count("MatMulInteger") == 2, ops


def test_structured_pruning_leaves_attention_heads_alone_and_names_them(tmp_path):
    torch.manual_seed(0)
    model = HandWrittenBlock().eval()
    x = torch.randn(8, 5, 16)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=tightfit.StructuredPrune(ratio=(0.25, 0.5)),
        budget=2,
        search="random",
        example_input=x,
        run_dir=tmp_path / "run",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    reasons = {s.name: s.reason for s in result.left_alone}
    assert "attention heads" in reasons["attn.q"]
    assert "up" in result.plan.layers  # the feed-forward group is still searched and pruned
    assert result.model.up.out_features < 32


def _never_ends(*args, **kwargs):  # like Torch-Pruning's endless grouping: a Python loop
    import time

    while True:
        time.sleep(0.01)


def test_a_channel_grouping_that_never_ends_is_cut_off(monkeypatch, caplog):
    import time

    from tightfit.operators import structured

    monkeypatch.setattr(structured, "coupled_groups", _never_ends)
    op = tightfit.StructuredPrune(trace_timeout=0.3)
    started = time.perf_counter()
    op.prepare(HandWrittenBlock(), torch.randn(2, 5, 16))
    assert time.perf_counter() - started < 5
    assert op.groups == {} and "no answer within 0.3 s" in caplog.text


def test_a_model_structured_pruning_cannot_trace_is_named_in_the_run_not_only_in_a_log(monkeypatch):
    # Hugging Face Llama: the grouping never ends; the run said nothing of it beyond a log line
    from tightfit.errors import ModelError
    from tightfit.operators import structured

    monkeypatch.setattr(structured, "coupled_groups", _never_ends)
    model, x = HandWrittenBlock().eval(), torch.randn(2, 5, 16)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=Compose([tightfit.StructuredPrune(trace_timeout=0.3), Quantize(bits=8)]),
        budget=1,
        search="random",
        example_input=x,
    )
    assert any("structured_prune left 6 layer(s)" in n and "cannot trace" in n for n in result.notes), result.notes
    with pytest.raises(ModelError, match="cannot trace the model's channel dependencies"):
        tightfit.compress(
            model,
            evaluate=_fidelity_metric(model, x),
            strategy=tightfit.StructuredPrune(trace_timeout=0.3),
            budget=1,
            example_input=x,
        )


def _in_a_thread(work):
    """Run ``work()`` in another thread (as a notebook or a worker would); its result or error."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the time limit did not stop the work"
    return outcome


def test_the_trace_time_limit_holds_off_the_main_thread(monkeypatch, caplog):
    from tightfit.operators import structured

    monkeypatch.setattr(structured, "coupled_groups", _never_ends)
    op = tightfit.StructuredPrune(trace_timeout=0.3)
    outcome = _in_a_thread(lambda: op.prepare(HandWrittenBlock(), torch.randn(2, 5, 16)))
    assert "error" not in outcome, outcome  # the run goes on: the model is left alone and named
    assert op.groups == {} and "no answer within 0.3 s" in caplog.text


class _SlowForward(nn.Module):
    """A forward pass that takes ``seconds`` (in Python steps): cut short while being traced."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.up, self.down = seconds, nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        import time

        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            time.sleep(0.01)
        return self.down(torch.relu(self.up(x)))


def test_a_trace_cut_short_leaves_no_hooks_and_no_late_timeout():
    import time

    from tightfit.operators.structured import TraceTimeout, _time_limit

    model = _SlowForward(seconds=30)
    op = tightfit.StructuredPrune(trace_timeout=0.3)
    outcome = _in_a_thread(lambda: op.prepare(model, torch.randn(2, 4)))
    assert "error" not in outcome and op.groups == {}
    # Torch-Pruning's recording hooks, left on the layers by the cut-short forward pass, are removed
    assert all(not m._forward_hooks for m in model.modules())

    def finishes_in_time():  # a block ending just before its limit: nothing is raised after it
        with _time_limit(0.2):
            pass
        end = time.perf_counter() + 0.8
        while time.perf_counter() < end:
            time.sleep(0.01)
        return "done"

    assert _in_a_thread(finishes_in_time) == {"value": "done"}

    def overruns():
        with _time_limit(0.2):
            _never_ends()

    assert isinstance(_in_a_thread(overruns)["error"], TraceTimeout)
    model.seconds = 0.0  # and a model traced in time is grouped as usual, from a thread too
    assert "error" not in _in_a_thread(lambda: op.prepare(model, torch.randn(2, 4)))
    assert op.groups == {"up": ["up", "down"]}


def test_structured_pruning_traces_through_frozen_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    model[0].requires_grad_(False)  # e.g. a frozen pretrained layer
    op = tightfit.StructuredPrune()
    op.prepare(model, torch.randn(2, 10))
    assert op.groups == {"0": ["0", "2"]}
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad  # as it was


def test_low_rank_keeps_a_float64_model_in_float64(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).double().eval()
    x = torch.randn(16, 64, dtype=torch.float64)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=tightfit.LowRank(rank_ratio=(0.1, 0.3)),
        budget=1,
        search="random",
        example_input=x,
        run_dir=tmp_path / "run",
    )
    assert result.feasible and "0" in result.plan.layers
    assert all(p.dtype == torch.float64 for p in result.model.parameters())


def test_a_refusal_under_a_composed_strategy_is_a_note(tmp_path):
    torch.manual_seed(0)
    model = HandWrittenBlock().eval()
    x = torch.randn(8, 5, 16)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=Compose([tightfit.StructuredPrune(ratio=(0.25, 0.5)), Prune()]),
        budget=1,
        search="random",
        example_input=x,
    )
    assert "attn.q" not in {s.name for s in result.left_alone}  # Prune still compresses it
    note = next(n for n in result.notes if n.startswith("structured_prune left"))
    assert "attn.q" in note and "attention heads" in note


def test_embedding_tables_are_pruned_and_quantized_unless_sparse(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    inputs = {"input_ids": torch.randint(0, 50, (8, 12))}
    plan = tightfit.Plan.from_strategy(
        Compose([Prune(), Quantize()]), {"embed": {"prune": {"sparsity": 0.5}, "quantize": {"bits": 4}}}
    )
    compressed = tightfit.apply(plan, model)
    assert float((compressed.embed.weight == 0).float().mean()) >= 0.5
    assert compressed.embed.weight[compressed.embed.weight != 0].abs().unique().numel() <= 8 * 50  # 4-bit per row
    tightfit.save(compressed, tmp_path / "m.tfz", plan=plan)
    assert torch.equal(tightfit.load(tmp_path / "m.tfz", model=TinyTransformer())(**inputs), compressed(**inputs))

    sparse = TinyTransformer()
    sparse.embed = nn.Embedding(50, 16, sparse=True)
    skipped = {s.name: s.reason for s in tightfit.measure.analyze(sparse).skipped}
    assert "sparse" in skipped["embed"]


class TakesOneDict(nn.Module):
    """``forward(batch)`` reads its inputs from one dict, as many multi-input models do."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.table = nn.Linear(6, 8)
        self.head = nn.Sequential(nn.Linear(4 * 4 * 4 + 8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, batch):
        return self.head(torch.cat([self.image(batch["image"]), torch.relu(self.table(batch["features"]))], dim=1))


def test_a_model_whose_forward_takes_one_dict_is_evaluated_traced_and_compressed(tmp_path):
    from tightfit.measure import call_model

    torch.manual_seed(0)
    model = TakesOneDict().eval()
    inputs = {"image": torch.randn(16, 1, 4, 4), "features": torch.randn(16, 6)}
    batches = [
        ({k: v[:8] for k, v in inputs.items()}, torch.randint(0, 3, (8,))),
        ({k: v[8:] for k, v in inputs.items()}, torch.randint(0, 3, (8,))),
    ]
    assert call_model(model, inputs).shape == (16, 3)  # the dict is the one argument, not keywords
    result = tightfit.compress(
        model,
        evaluate=tightfit.Accuracy(batches),
        finetune=tightfit.FineTune(batches, epochs=1),
        strategy=Compose([tightfit.StructuredPrune(ratio=0.5), Quantize(bits=8)]),
        constraint=tightfit.MaxDrop(1.0),
        budget=2,
        search="random",
        example_input=inputs,
        objective="flops",
        run_dir=tmp_path / "run",
    )
    assert all(t.state == "COMPLETE" for t in result.trials), [t.error for t in result.trials]
    assert result.feasible and result.model.head[0].out_features == 8  # traced through the dict, and pruned
    assert torch.equal(tightfit.load(tmp_path / "run" / "model.tfz", model=model)(inputs), result.model(inputs))
    from tightfit.export import export_run

    report = export_run(tmp_path / "run", format="torchscript", model=model)  # traced with the dict as its one argument
    assert torch.allclose(torch.jit.load(report.path)(inputs), result.model(inputs), atol=1e-5)


def test_an_error_metric_given_as_is_gets_a_note_on_the_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        y = model(x) + 0.01 * torch.randn(32, 1)

    def mse(m):  # lower is better: the mistake this note is for
        with torch.no_grad():
            return float(((m(x) - y) ** 2).mean())

    result = tightfit.compress(model, evaluate=mse, strategy=Prune(sparsity=(0.5, 0.9)), budget=3, search="random")
    assert any("return its negative" in note for note in result.notes), result.notes
    negative = tightfit.compress(
        model,
        evaluate=lambda m: -mse(m),
        strategy=Prune(sparsity=(0.5, 0.9)),
        constraint=tightfit.MinMetric(-1.0),
        budget=3,
        search="random",
    )
    assert not any("return its negative" in note for note in negative.notes)


def test_a_regression_model_fine_tuned_with_the_default_loss_fails_with_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0)).eval()
    x, y = torch.randn(16, 8), torch.randn(16)  # float targets, one output per sample
    # cross-entropy would accept these (as one unbatched row of class probabilities) and train on nonsense
    result = tightfit.compress(
        model,
        evaluate=lambda m: -float(((m(x) - y) ** 2).mean()),
        strategy=Prune(),
        finetune=tightfit.FineTune([(x, y)], epochs=1),
        budget=2,
        search="random",
    )
    assert all(t.state == "FAIL" and "loss=callable(model, batch)" in t.error for t in result.trials)
    assert not result.feasible and "every trial failed" in result.message
    soft = tightfit.FineTune([(x, torch.softmax(torch.randn(16, 3), dim=1))], epochs=1)  # class probabilities: fine
    soft(nn.Linear(8, 3))
    # a binary classifier's one logit per sample: cross-entropy raised "Target 1 is out of bounds"
    binary = tightfit.FineTune([(x, (y > 0).long())], epochs=1)
    with pytest.raises(
        tightfit.errors.ConfigError, match=r"one score per sample \(shape \(16, 1\)\).*binary_cross_entropy_with_logits"
    ):
        binary(nn.Linear(8, 1))


def test_low_rank_factorizes_a_transformer_layers_feed_forward(tmp_path):
    # nn.TransformerEncoderLayer's fused inference path reads linear1.weight / linear2.weight
    # itself; the factorized stand-in gives it their dense product, so the layers are compressed,
    # not refused, and both paths compute the same
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)).eval()
    x = torch.randn(4, 6, 16)
    op = tightfit.LowRank(rank_ratio=(0.25, 0.5))
    op.prepare(model, x)
    assert "0.linear1" not in op.refused() and "0.linear2" not in op.refused()
    plan = tightfit.Plan.from_strategy(
        Compose([tightfit.LowRank()]),
        {"0.linear1": {"low_rank": {"rank_ratio": 0.25}}, "0.linear2": {"low_rank": {"rank_ratio": 0.25}}},
    )
    factored = tightfit.apply(plan, model)
    assert factored[0].linear1[0].weight.shape == (4, 16)  # rank 4 of 16
    with torch.no_grad():
        fused = factored(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = factored(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fused, unfused, atol=1e-5)
    tightfit.save(factored, tmp_path / "m.tfz", plan=plan)
    with torch.no_grad():
        assert torch.allclose(tightfit.load(tmp_path / "m.tfz", model=model)(x), fused, atol=1e-6)


class TinyUNet(nn.Module):
    """Encoder, ConvTranspose2d and nn.Upsample decoder joined by a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.resize = nn.Upsample(scale_factor=2)
        self.dec = nn.Conv2d(24, 1, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.enc(x))
        b = torch.relu(self.down(a))
        return self.dec(torch.cat([a, self.up(b), self.resize(b)], dim=1))


def test_transposed_convolution_is_pruned_and_quantized_and_named_where_it_is_not(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.randn(8, 1, 8, 8)
    assert {layer.name: layer.kind for layer in tightfit.analyze(model).layers}["up"] == "ConvTranspose2d"
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        constraint=tightfit.MaxDrop(10.0),
        strategy=Compose([Prune(sparsity=0.5), Quantize(bits=4)]),
        budget=1,
        search="random",
        example_input=x[:1],
    )
    assert result.feasible and {"up", "enc", "dec"} <= set(result.plan.layers) and not result.left_alone
    assert float((result.model.up.weight == 0).float().mean()) >= 0.5
    codes = result.model.up.weight / result.model.up.weight.abs().amax(dim=(1, 2, 3), keepdim=True) * 7
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # 4-bit grid, one scale per input channel
    tightfit.save(result, tmp_path / "unet.tfz")
    assert torch.equal(tightfit.load(tmp_path / "unet.tfz", model=model)(x), result.model(x))
    lowrank = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        strategy=tightfit.LowRank(0.5),
        budget=1,
        search="random",
        example_input=x[:1],
        constraint=tightfit.MaxDrop(10.0),
    )
    assert "low_rank does not compress a ConvTranspose2d" in {s.name: s.reason for s in lowrank.left_alone}["up"]


def test_a_user_recovery_that_leaves_the_model_training_is_evaluated_and_saved_in_eval_mode():
    # A hand-written loop calls model.train() and returns: the metric (which does not call eval())
    # read dropout and batch statistics, and its passes moved the BatchNorm statistics that were saved.
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(16, 3, 8, 8)
    modes = []

    def metric(m):
        modes.append(m.training)
        with torch.no_grad():
            return float(m(x).mean())

    def recover(m):
        m.train()
        with torch.no_grad():
            m(x)  # the loop's forward passes update BatchNorm statistics, as training does

    result = tightfit.compress(
        model,
        evaluate=metric,
        finetune=recover,
        strategy=Prune(sparsity=0.2),
        budget=2,
        search="random",
        constraint=tightfit.MaxDrop(10.0),
    )
    assert modes and not any(modes)
    assert not any("Re-evaluating the saved model" in note for note in result.notes)


class OwnRMSNorm(nn.Module):
    """A library's own norm layer (as Hugging Face's LlamaRMSNorm): one scale per channel."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_layer_of_any_library_is_named_as_one():
    model = nn.Sequential(nn.Linear(4, 8), OwnRMSNorm(8), nn.RMSNorm(8), nn.Linear(8, 2))
    reasons = {s.name: s.reason for s in tightfit.analyze(model).skipped}
    assert reasons["1"].startswith("normalization layer") and reasons["2"].startswith("normalization layer")


def test_low_rank_says_why_it_leaves_a_convolution_whole():
    # a depthwise Conv1d and a layer too thin to factorize read "low_rank does not compress a Conv1d layer"
    model = nn.Sequential(
        nn.Conv1d(1, 16, 9), nn.Conv1d(16, 16, 3, groups=16), nn.Conv1d(16, 16, 5), nn.Flatten(), nn.Linear(16 * 18, 1)
    ).eval()
    x = torch.randn(4, 1, 32)
    result = tightfit.compress(
        model,
        evaluate=_fidelity_metric(model, x),
        strategy=tightfit.LowRank(0.3),
        budget=1,
        search="random",
        example_input=x,
        constraint=tightfit.MaxDrop(10.0),
    )
    reasons = {s.name: s.reason for s in result.left_alone}
    assert {"0", "2"} <= set(result.plan.layers)
    assert "grouped or depthwise convolution" in reasons["1"]
    assert "would not make it cheaper" in reasons["4"] and "1x288" in reasons["4"]
