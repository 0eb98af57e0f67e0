"""compress(..., calibration=batches): calibrated operators inside the search."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tightfit
from tightfit import ConfigError, Quantize
from tightfit.evaluation import loader_inputs
from tightfit.export.artifact import load_model


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(384, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
        opt.step()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:256], y[:256]), batch_size=64)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[256:], y[256:]), batch_size=64)
    return model.eval(), train, val


def _search(model, strategy, evaluate, calibration, run_dir):
    """Three random trials under MaxDrop(0.2): every one compressed from ``calibration``."""
    return tightfit.compress(
        model,
        evaluate=evaluate,
        strategy=strategy,
        constraint=tightfit.MaxDrop(0.2),
        budget=3,
        calibration=calibration,
        run_dir=run_dir,
        search="random",
    )


def test_gptq_inside_compress_round_trips(tmp_path):
    model, train, val = _task()
    calls = []
    metric = tightfit.Accuracy(val)

    def evaluate(m):
        calls.append(1)
        return metric(m)

    strategy = Quantize(bits=(3, 4), method="gptq", group_size=16)
    with pytest.raises(ConfigError, match="calibration="):
        tightfit.compress(model, evaluate=evaluate, strategy=strategy, budget=3)
    assert not calls  # refused before the original was evaluated

    calibration = loader_inputs(train, max_samples=128)
    assert sum(b.shape[0] for b in calibration) == 128 and all(b.shape[1] == 32 for b in calibration)
    result = _search(model, strategy, evaluate, calibration, tmp_path / "run")
    assert result.feasible and result.plan is not None
    loaded = load_model(io.BytesIO(result.artifact), model)
    assert metric(loaded) == result.metric
    x = next(iter(val))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    # the file holds 3/4-bit codes: far smaller than float32
    assert result.size_bytes < result.baseline_size_bytes / 3

    # a resume with other calibration data is refused (the plans were fitted on the first)
    other = loader_inputs(val, max_samples=128)
    with pytest.raises(ConfigError, match="calibration"):
        tightfit.compress(
            model,
            evaluate=metric,
            strategy=strategy,
            budget=3,
            calibration=other,
            run_dir=tmp_path / "run",
            search="random",
        )


def test_calibrated_replay_is_deterministic():
    model, train, _ = _task()
    from tightfit.operators.compose import as_strategy
    from tightfit.run.evaluator import apply_to_copy

    strategy = as_strategy(Quantize(bits=3, method="gptq", group_size=16))
    plan = tightfit.compress_once(model, strategy, loader_inputs(train, 128)).plan
    batches = loader_inputs(train, 128)
    a = apply_to_copy(plan, model, strategy, batches)
    b = apply_to_copy(plan, model, strategy, batches)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)


def test_a_search_fits_layers_to_the_original_and_its_answer_replays(tmp_path):
    """``target="original"`` inside the search: every trial fits to the caller's model (left
    unchanged), and the answer's file loads to the weights a fresh calibrated pass gives."""
    import copy

    from tightfit.operators.calibrated import apply_plan_calibrated

    model, train, val = _task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = loader_inputs(train, max_samples=128)
    strategy = tightfit.Prune((0.3, 0.7), method="sparsegpt", target="original")
    result = _search(model, strategy, tightfit.Accuracy(val), calibration, tmp_path / "run")
    assert result.feasible and result.plan is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [op.target for op in result.plan.strategy()] == ["original"]  # kept in the run's plan
    replay = apply_plan_calibrated(result.plan, copy.deepcopy(model), calibration).model  # strategy from the plan
    loaded = load_model(io.BytesIO(result.artifact), model)
    x = next(iter(val))[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), replay(x), atol=1e-5)
