"""Calibration passes on cached block inputs (tightfit.operators.blocks): the same compressed
weights as running the whole model for every layer, fewer block runs, and the whole-model passes
wherever the cached inputs would not reproduce them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tightfit import Prune, Quantize
from tightfit.operators.calibrated import apply_plan_calibrated
from tightfit.run.oneshot import one_shot_plan


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: on the shared 2-core machine two threads made a 0.6 s test take 15 s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _both_ways(model: nn.Module, strategy, calibration: list, blocks: str | None = None):
    """Compress copies of ``model`` with and without the block cache; per arm the result, the
    weights and how many times a block ran to its end (a pass ended at a layer does not count)."""
    plan, _ = one_shot_plan(model, strategy)
    out = []
    for block_cache in (True, False):
        work = copy.deepcopy(model)
        runs = []
        module_list = work.get_submodule(blocks) if blocks else []
        handles = [b.register_forward_hook(lambda *_, runs=runs: runs.append(1)) for b in module_list]
        result = apply_plan_calibrated(plan, work, calibration, block_cache=block_cache)
        for h in handles:
            h.remove()
        out.append((result, {k: v.detach().clone() for k, v in work.state_dict().items()}, len(runs)))
    return out


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def _gpt2(use_cache: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
    )
    config.use_cache = use_cache
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    "strategy",
    [
        Quantize(4, method="gptq", group_size=16, layers=["transformer.h.*"]),
        Prune(0.5, method="sparsegpt", layers=["transformer.h.*"]),
        Prune(pattern="2:4", method="wanda", layers=["transformer.h.*"]),
    ],
    ids=["gptq", "sparsegpt", "wanda"],
)
def test_gpt2_blocks_give_the_whole_model_weights_with_fewer_block_runs(strategy):
    model = _gpt2(use_cache=True)  # a key/value cache passed block to block: turned off while calibrating
    g = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(3)]
    (cached, cached_weights, cached_runs), (whole, whole_weights, whole_runs) = _both_ways(
        model, strategy, calibration, "transformer.h"
    )
    assert cached.blocks == "transformer.h" and cached.blocks_not_cached == ""
    assert cached.block_passes == cached.calibration_passes == 12 and whole.block_passes == 0
    assert whole.blocks == "" and "block_cache=False" in whole.blocks_not_cached
    assert _same_weights(cached_weights, whole_weights)
    assert not _same_weights(cached_weights, model.state_dict())  # something was compressed
    # whole model: each layer of block i runs blocks 0..i-1 to their end (3 blocks, 3 batches: 36 runs,
    # + 3 finding the order); cached: each block once to hand on its outputs (6), + 9 checking and ordering
    assert cached_runs < 0.5 * whole_runs, (cached_runs, whole_runs)
    assert model.config.use_cache is True


def _bert_or_llama(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    small |= {"intermediate_size": 64, "max_position_embeddings": 32}
    if kind == "bert":  # padding tokens: left out of the statistics by the batch's mask, block or not
        model = transformers.BertModel(transformers.BertConfig(**small))
        mask = torch.cat([torch.ones(4, 12, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)], 1)
        return model.eval(), "encoder.layer", [{"input_ids": torch.randint(0, 50, (4, 16)), "attention_mask": mask}]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **small))
    return model.eval(), "model.layers", [{"input_ids": torch.randint(0, 50, (4, 16))} for _ in range(2)]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bert_and_llama_blocks_give_the_whole_model_weights(kind):
    # BERT hands each layer an extended attention mask; Llama its rotary position embeddings (a tuple)
    model, blocks, calibration = _bert_or_llama(kind)
    strategy = Quantize(4, method="gptq", group_size=16, layers=[blocks + ".*"])
    (cached, cached_weights, _), (_, whole_weights, _) = _both_ways(model, strategy, calibration)
    assert cached.blocks == blocks and cached.block_passes == cached.calibration_passes > 0
    assert _same_weights(cached_weights, whole_weights)


class _Stage(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _CNN(nn.Module):
    """Stages in a ModuleList; ``pool``: a pooling between stages (block k+1 does not get block k's output)."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stages = nn.ModuleList(_Stage(8) for _ in range(3))
        self.head = nn.Linear(8, 4)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            x = nn.functional.max_pool2d(x, 2) if self.pool else x
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("pool", [True, False], ids=["falls-back", "cached"])
def test_cnn_stages_give_the_whole_model_weights_or_fall_back(pool):
    torch.manual_seed(0)
    model = _CNN(pool).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)]
    strategy = Quantize(4, method="gptq", group_size=8)
    (cached, cached_weights, _), (_, whole_weights, _) = _both_ways(model, strategy, calibration)
    assert _same_weights(cached_weights, whole_weights)
    if pool:
        assert cached.blocks == "" and cached.block_passes == 0
        assert "block 1's inputs are not block 0's output" in cached.blocks_not_cached
    else:  # the stem and head run the whole model, the stages their block
        assert (
            cached.blocks == "stages" and cached.block_passes == 3 and cached.calibration_passes == 5 + 1
        )  # + BatchNorm repair


class _Counter:
    def __init__(self) -> None:
        self.calls = 0


class _StatefulBlocks(nn.Module):
    """Blocks handed an object they change: a cached input could not replay it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_CountingBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = _Counter()
        for block in self.blocks:
            x = block(x, state)
        return x


class _CountingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, state: _Counter) -> torch.Tensor:
        state.calls += 1
        return self.fc(x) * state.calls


def test_blocks_taking_state_run_the_whole_model():
    torch.manual_seed(0)
    model = _StatefulBlocks().eval()
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(1))]
    (cached, cached_weights, _), (_, whole_weights, _) = _both_ways(model, Quantize(4, method="gptq"), calibration)
    assert cached.blocks == "" and "takes a _Counter argument" in cached.blocks_not_cached
    assert _same_weights(cached_weights, whole_weights)
