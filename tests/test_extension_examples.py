"""The extension examples of ARCHITECTURE.md run as written: each example is loaded as its own
module, its one registry line is run, and it works inside ``compress``. An example that needs any
other change to run fails here."""

from __future__ import annotations

import copy
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import tightfit
from tightfit.operators import OPERATOR_REGISTRY, Compose, Plan, Prune, apply, register_operator
from tightfit.search import register_search
from tightfit.search.samplers import SAMPLERS

DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def _blocks() -> dict[str, str]:
    """``example: <kind>`` and ``registry: <kind>`` code blocks of ARCHITECTURE.md, by tag."""
    found = re.findall(r"<!-- (example|registry): (\w+)[^>]*-->\n```python\n(.*?)```", DOC.read_text(), re.S)
    return {f"{tag}:{kind}": code for tag, kind, code in found}


def _load(kind: str, registry_names: dict) -> types.ModuleType:
    """The example as its own module, then its registry line run where the registry lives."""
    blocks = _blocks()
    module = types.ModuleType(f"tightfit_example_{kind}")
    exec(compile(blocks[f"example:{kind}"], f"ARCHITECTURE.md example {kind}", "exec"), module.__dict__)
    exec(
        compile(blocks[f"registry:{kind}"], f"ARCHITECTURE.md registry {kind}", "exec"),
        {**registry_names, **module.__dict__},
    )
    return module


@pytest.fixture(scope="module")
def task():
    """A tiny classifier and data: a compress run takes about a second."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), loader


def test_every_extension_point_has_an_example_and_a_registry_line():
    assert set(_blocks()) == {
        f"{tag}:{kind}" for tag in ("example", "registry") for kind in ("operator", "sampler", "recovery")
    }


def test_the_operator_example(task, tmp_path):
    model, loader = task
    module = _load("operator", {"register_operator": register_operator})
    try:
        op = module.RelativePrune()
        assert OPERATOR_REGISTRY["relative_prune"] is module.RelativePrune
        x = loader[0][0]
        identity = Plan.from_strategy(Compose([op]), {"0": {op.name: op.identity()}, "2": {op.name: op.identity()}})
        assert torch.equal(apply(identity, model)(x), model(x))  # identity changes nothing
        before = copy.deepcopy(model.state_dict())
        pruned = apply(Plan.from_strategy(Compose([op]), {"0": {op.name: {"threshold": 0.3}}}), model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
        assert (pruned[0].weight == 0).float().mean() > 0.2
        result = tightfit.compress(
            model,
            evaluate=tightfit.Accuracy(loader),
            strategy=op,
            budget=3,
            seed=0,
            constraint=tightfit.MaxDrop(1.0),
            search="random",
        )
        loaded = tightfit.load(_saved(result, tmp_path))  # the registry maps the plan back to the operator
        assert torch.allclose(loaded(x), result.model(x), atol=1e-5)
    finally:
        OPERATOR_REGISTRY.pop("relative_prune", None)


def _saved(result, tmp_path):
    path = tmp_path / "model.tfz"
    tightfit.save(result, path)
    return path


def test_the_sampler_example(task):
    model, loader = task
    _load("sampler", {"register_search": register_search})
    try:
        runs = [
            tightfit.compress(
                model,
                evaluate=tightfit.Accuracy(loader),
                strategy=Prune(),
                budget=4,
                seed=3,
                constraint=tightfit.MaxDrop(1.0),
                search="qmc",
            )
            for _ in range(2)
        ]
        plans = [[t.plan.to_dict() for t in r.trials] for r in runs]
        assert plans[0] == plans[1] and len(plans[0]) == 4  # seeded: the same plans again
        assert len({str(p) for p in plans[0]}) > 1
    finally:
        SAMPLERS.pop("qmc", None)


def test_the_recovery_example(task):
    from tightfit.cli.config import RECOVERY_METHODS

    model, loader = task
    module = _load("recovery", {"RECOVERY_METHODS": RECOVERY_METHODS})
    try:
        assert RECOVERY_METHODS["cosine"] == "CosineFineTune"
        recover = module.CosineFineTune(loader, epochs=2)
        pruned = apply(Plan.from_strategy(Compose([Prune()]), {"0": {"prune": {"sparsity": 0.5}}}), model)
        zeros = pruned[0].weight == 0
        recover(pruned)
        assert recover.steps_taken == 2 * len(loader)
        assert torch.all(pruned[0].weight[zeros] == 0)  # the plan's zeros held through training
        result = tightfit.compress(
            model,
            evaluate=tightfit.Accuracy(loader),
            strategy=Prune(),
            budget=2,
            seed=0,
            constraint=tightfit.MaxDrop(1.0),
            search="random",
            finetune=recover,
        )
        assert result.feasible and all(t.finetune_steps == 2 * len(loader) for t in result.trials)
    finally:
        RECOVERY_METHODS.pop("cosine", None)
