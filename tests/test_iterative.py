"""prune_and_adjust: OLMP's rounds of search (no training) and adjust (training)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.measure.analysis import count_nonzeros
from tightfit.recovery import FineTune, GradualPrune


def _toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    FineTune(loader, epochs=15, lr=1e-2)(model)
    return model.eval(), loader


def _nonzeros(model):
    return count_nonzeros(model, ["0", "2"])[0]


def test_rounds_compress_further_and_undo_a_round_that_loses_too_much(tmp_path):
    model, loader = _toy()

    def evaluate(m):  # a metric with a cliff: fine above 120 nonzeros, 0.7 below
        return 1.0 if _nonzeros(m) > 120 else 0.7

    seen = []
    result = tightfit.prune_and_adjust(
        model,
        evaluate=evaluate,
        adjust=GradualPrune(loader, epochs=1, lr=1e-2),
        max_drop=0.0,
        rounds=3,
        step=0.4,
        search="random",
        search_budget=6,
        on_round=seen.append,
    )
    assert [r.number for r in result.rounds] == [1, 2, 3] and seen == result.rounds
    first = result.rounds[0]
    # a step of 0.4 lets the untrained search go below the cliff: the adjusted model loses 0.3, undone
    assert not first.accepted and first.metric == 0.7
    # the next step is half as large, so every plan stays above the cliff and is kept
    assert result.rounds[1].step == pytest.approx(0.2) and result.rounds[1].accepted
    assert result.metric == 1.0 and _nonzeros(result.model) > 120
    assert _nonzeros(result.model) < 8 * 32 + 32 * 4 and result.nonzero_ratio > 1
    assert result.training_steps == 3 * len(loader)
    size = result.save(tmp_path / "m.tfz")
    loaded = tightfit.load(tmp_path / "m.tfz")
    assert size == (tmp_path / "m.tfz").stat().st_size
    x = torch.randn(4, 8)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-5)


def test_the_original_model_is_not_modified_and_bad_arguments_are_clear():
    model, loader = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    result = tightfit.prune_and_adjust(
        model, evaluate=lambda m: 1.0, adjust=GradualPrune(loader, epochs=1), rounds=1, search="random", search_budget=2
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.rounds[0].accepted
    with pytest.raises(ConfigError, match="only prune"):
        tightfit.prune_and_adjust(
            model, evaluate=lambda m: 1.0, adjust=GradualPrune(loader), strategy=tightfit.Quantize()
        )
    with pytest.raises(ConfigError, match="rounds"):
        tightfit.prune_and_adjust(model, evaluate=lambda m: 1.0, adjust=GradualPrune(loader), rounds=0)
    with pytest.raises(ConfigError, match="no round was accepted"):
        tightfit.iterative.PruneAdjustResult(model, None, 1.0, 1.0, 1.0).save("x.tfz")


def test_a_gentler_plan_never_regrows_an_earlier_rounds_zeros():
    from tightfit.iterative import _keep_zeros

    model, loader = _toy()
    with torch.no_grad():
        model[0].weight[:, :4] = 0.0  # an earlier round pruned half of the first layer
    plan = tightfit.Plan.from_strategy(
        tightfit.Compose([tightfit.Prune()]), {"0": {"prune": {"sparsity": 0.1}}, "2": {"prune": {"sparsity": 0.1}}}
    )
    candidate = tightfit.apply(plan, model)
    _keep_zeros(candidate)
    GradualPrune(loader, epochs=2, lr=1e-2)(candidate)
    assert (candidate[0].weight[:, :4] == 0).all()


class _Interrupt(Exception):
    pass


class _Counted:
    """The adjust, counting the calls that finished."""

    def __init__(self, adjust) -> None:
        self.adjust, self.finished = adjust, 0

    @property
    def steps_taken(self):
        return self.adjust.steps_taken

    def __call__(self, model) -> None:
        self.adjust(model)
        self.finished += 1


class _StopAt:
    """The adjust, interrupted (like Ctrl-C or a killed process) in its ``at``-th call."""

    def __init__(self, adjust, at: int) -> None:
        self.adjust, self.at, self.calls = adjust, at, 0

    @property
    def steps_taken(self):
        return self.adjust.steps_taken

    def __call__(self, model) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise _Interrupt
        self.adjust(model)


def _cliff(m):
    return 1.0 if _nonzeros(m) > 120 else 0.7


_ARGUMENTS = dict(max_drop=0.0, step=0.4, search="random", search_budget=6, rounds=3)


@pytest.fixture(scope="module")
def uninterrupted():
    """A toy model, its data and the uninterrupted 3-round run the resumed ones must equal."""
    model, loader = _toy()
    adjust = _Counted(GradualPrune(loader, epochs=1, lr=1e-2))
    whole = tightfit.prune_and_adjust(model, evaluate=_cliff, adjust=adjust, **_ARGUMENTS)
    assert adjust.finished == 3
    return model, loader, whole


def _same_answer(resumed, whole, run) -> None:
    assert [
        (r.step, r.accepted, r.metric, r.nonzero_ratio, r.training_steps, r.plan.to_dict()) for r in resumed.rounds
    ] == [(r.step, r.accepted, r.metric, r.nonzero_ratio, r.training_steps, r.plan.to_dict()) for r in whole.rounds]
    x = torch.randn(4, 8)
    assert torch.equal(resumed.model(x), whole.model(x))
    assert (run / "model.tfz").read_bytes() == resumed._file
    assert torch.equal(tightfit.load(run / "model.tfz")(x), whole.model(x))


def test_a_run_directory_resumes_an_interrupted_run_to_the_uninterrupted_answer(tmp_path, uninterrupted):
    model, loader, whole = uninterrupted
    arguments = dict(evaluate=_cliff, **_ARGUMENTS)

    run = tmp_path / "run"
    with pytest.raises(_Interrupt):  # killed in round 3's adjust: rounds 1-2 are on disk
        tightfit.prune_and_adjust(
            model, adjust=_StopAt(GradualPrune(loader, epochs=1, lr=1e-2), 3), run_dir=run, **arguments
        )
    stored = json.loads((run / "rounds.json").read_text())
    assert [r["number"] for r in stored["rounds"]] == [1, 2]
    assert (run / "round-03" / "study.db").exists()  # round 3's search finished before the adjust; it is not redone
    assert not (run / "round-03" / "adjusted.json").exists()

    seen = []
    adjust = _Counted(GradualPrune(loader, epochs=1, lr=1e-2))
    resumed = tightfit.prune_and_adjust(model, adjust=adjust, run_dir=run, on_round=seen.append, **arguments)
    assert [r.number for r in seen] == [3] and adjust.finished == 1  # the interrupted adjust, started over
    _same_answer(resumed, whole, run)

    # finished: calling again does no work; a larger `rounds` continues from round 4
    again = tightfit.prune_and_adjust(
        model, adjust=_StopAt(GradualPrune(loader, epochs=1), 1), run_dir=run, **arguments
    )
    assert len(again.rounds) == 3 and again.nonzero_ratio == whole.nonzero_ratio

    with pytest.raises(ConfigError, match="other settings.*step"):
        tightfit.prune_and_adjust(
            model, adjust=GradualPrune(loader, epochs=1), run_dir=run, **{**arguments, "step": 0.3}
        )


def test_an_adjust_that_finished_is_not_trained_again_on_resume(tmp_path, uninterrupted):
    model, loader, whole = uninterrupted
    adjust = _Counted(GradualPrune(loader, epochs=1, lr=1e-2))
    killed = []

    def evaluate(m):  # the process dies while measuring round 2's adjusted model
        if adjust.finished == 2 and not killed:
            killed.append(True)
            raise _Interrupt
        return _cliff(m)

    run = tmp_path / "run"
    with pytest.raises(_Interrupt):
        tightfit.prune_and_adjust(model, evaluate=evaluate, adjust=adjust, run_dir=run, **_ARGUMENTS)
    stored = json.loads((run / "rounds.json").read_text())
    assert [r["number"] for r in stored["rounds"]] == [1]
    assert (run / "round-02" / "adjusted.json").exists() and (run / "round-02" / "adjusted.tfz").exists()

    before = adjust.finished
    resumed = tightfit.prune_and_adjust(model, evaluate=_cliff, adjust=adjust, run_dir=run, **_ARGUMENTS)
    assert adjust.finished - before == 1  # round 3 only: round 2's adjust is taken from disk
    assert adjust.finished == 3  # as many adjusts as the uninterrupted run
    _same_answer(resumed, whole, run)
    # recorded rounds keep no separate adjust record, and an undone round no model
    assert not list(run.glob("round-*/adjusted.json"))
    assert sorted(p.parent.name for p in run.glob("round-*/adjusted.tfz")) == [
        f"round-{r.number:02d}" for r in whole.rounds if r.accepted
    ]


def test_settings_are_checked_before_the_first_round_is_recorded(tmp_path, uninterrupted):
    model, loader, _ = uninterrupted
    run, arguments = tmp_path / "run", {**_ARGUMENTS, "search_budget": 2}
    with pytest.raises(_Interrupt):  # killed in round 1's adjust: no round recorded yet
        tightfit.prune_and_adjust(
            model, evaluate=_cliff, adjust=_StopAt(GradualPrune(loader, epochs=1), 1), run_dir=run, **arguments
        )
    with pytest.raises(ConfigError, match="other settings.*max_drop"):
        tightfit.prune_and_adjust(
            model, evaluate=_cliff, adjust=GradualPrune(loader, epochs=1), run_dir=run, **{**arguments, "max_drop": 0.1}
        )
