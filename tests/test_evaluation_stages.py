"""Fidelity levels inside the fine-tune (cheap evaluation): the stop rule on synthetic learning
curves, the optimizer-step hook that stops a fine-tune, and the accounting of the stages."""

import copy

import optuna
import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.evaluation import Sequential
from tightfit.evaluation.stages import (
    CURVE_ATTR,
    Curve,
    EarlyStop,
    gain_bound,
    hopeless,
    planned_steps,
    stage_steps,
    staged,
)
from tightfit.operators import Compose, Prune, Quantize

# --- the stop rule on synthetic learning curves ----------------------------------------------------


def _curve(stage_value: float, final: float, se: float = 0.005) -> Curve:
    """A completed candidate: constraint value ``stage_value`` after the first stage, ``final`` at the end."""
    return Curve(total_steps=90, samples=128, stages=((stage_value,),), final=(final,), gain_se=((se,),))


CURVES = [_curve(0.06, 0.00), _curve(0.10, 0.07), _curve(0.02, -0.01)]  # gains 0.06, 0.03, 0.03


def test_gain_bound_is_the_largest_gain_inflated():
    assert gain_bound(CURVES, 0, 0, slack=0.5) == pytest.approx(1.5 * 0.06 + 0.005)
    # fine-tuning that never helped still leaves room for the gains' noise
    assert gain_bound([_curve(0.0, 0.01)], 0, 0, slack=0.5) == pytest.approx(0.005)


def test_hopeless_candidate_is_stopped_and_a_recoverable_one_is_not():
    bound = 1.5 * 0.06 + 0.005
    # far above anything the remaining steps ever gave: stopped, and its prediction stays infeasible
    stop, predicted = hopeless([0.30], [0.02], CURVES, 0, z=2.0, slack=0.5, min_curves=3)
    assert stop and predicted[0] == pytest.approx(0.30 - bound) and predicted[0] > 0
    # a value the remaining steps could still bring below zero: goes on
    stop, _ = hopeless([0.08], [0.02], CURVES, 0, z=2.0, slack=0.5, min_curves=3)
    assert not stop
    # above the bound, but not surely (its own noise): goes on
    stop, _ = hopeless([bound + 0.01], [0.02], CURVES, 0, z=2.0, slack=0.5, min_curves=3)
    assert not stop
    # any one constraint surely broken is enough
    stop, _ = hopeless(
        [-0.5, 0.30],
        [0.02, 0.02],
        [Curve(90, 128, ((0.1, 0.06),), (0.05, 0.0), ((0.005, 0.005),))] * 3,
        0,
        z=2.0,
        slack=0.5,
        min_curves=3,
    )
    assert stop


def test_no_stop_before_enough_curves():
    stop, predicted = hopeless([0.9], [0.01], CURVES[:2], 0, z=2.0, slack=0.5, min_curves=3)
    assert not stop and predicted == (0.9,)
    stop, _ = hopeless([0.9], [0.01], CURVES, 1, z=2.0, slack=0.5, min_curves=1)  # no curve reached stage 1
    assert not stop


def test_curve_round_trip_and_gains():
    c = Curve(120, 64, ((0.2, 0.1), (0.05, 0.0)), (0.01, -0.02), ((0.01, 0.01), (0.004, 0.004)))
    assert Curve.from_dict(c.to_dict()) == c
    assert c.gains[0] == pytest.approx((0.19, 0.12))


def test_stage_steps_and_planned_steps(digits):
    assert stage_steps(90, (1 / 3, 2 / 3)) == [30, 60]
    assert stage_steps(2, (0.1, 0.9)) == [1]  # distinct, inside the fine-tune
    loader = digits.loader("train", shuffle=True)
    assert planned_steps(tightfit.FineTune(loader, epochs=3)) == 3 * len(loader)
    assert planned_steps(tightfit.FineTune(loader, epochs=3, max_steps=10)) == 10
    assert planned_steps(lambda model: None) is None


def test_stage_options_are_checked():
    with pytest.raises(ConfigError, match="stages"):
        Sequential(stages=(0.5, 1.5))
    with pytest.raises(ConfigError, match="stage_samples"):
        Sequential(stage_samples=1)
    assert Sequential(stages=(0.6, 0.2)).stages == (0.2, 0.6)


# --- the hook inside a real fine-tune ----------------------------------------------------------------


def test_staged_fine_tune_is_exact_when_not_stopped_and_stops_at_the_stage(mlp, digits):
    finetune = tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3)
    total = planned_steps(finetune)
    at = stage_steps(total, (1 / 3, 2 / 3))
    evaluate = tightfit.Accuracy(digits.loader("val", 512))

    plain = copy.deepcopy(mlp)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        finetune(plain)

    checked = []
    staged_model = copy.deepcopy(mlp)

    def look(stage, steps):  # evaluates mid-fine-tune, as the stage looks do
        checked.append((stage, steps, evaluate.per_sample(staged_model, torch.arange(64)).mean().item()))
        return False

    with torch.random.fork_rng(), staged(staged_model, at, look) as count:
        torch.manual_seed(0)
        finetune(staged_model)
    assert [(s, n) for s, n, _ in checked] == [(0, at[0]), (1, at[1])] and count.steps == total
    for a, b in zip(plain.state_dict().values(), staged_model.state_dict().values()):
        assert torch.equal(a, b)  # the looks changed nothing: same weights as an unstaged fine-tune

    stopped_model = copy.deepcopy(mlp)
    with staged(stopped_model, at, lambda stage, steps: stage == 0) as count, pytest.raises(EarlyStop):
        finetune(stopped_model)
    assert count.steps == at[0]  # the step that reached the stage was taken

    # another model's optimizer is not counted
    other = nn.Linear(3, 1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with staged(stopped_model, [1], lambda stage, steps: True) as count:
        other(torch.ones(1, 3)).sum().backward()
        opt.step()
    assert count.steps == 0


# --- end to end: a hopeless candidate is stopped, and the stages are accounted --------------------------


@pytest.mark.slow
def test_search_stops_hopeless_candidates_and_accounts_the_stages(mlp, digits):
    evaluate = tightfit.Accuracy(digits.loader("val", 512))
    finetune = tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-4)  # recovers little
    result = tightfit.compress(
        mlp,
        evaluate=evaluate,
        strategy=Compose([Prune(sparsity=(0.0, 0.995)), Quantize(bits=(2, 4, 8))]),
        constraint=tightfit.MaxDrop(0.02),
        finetune=finetune,
        budget=10,
        search="random",
        seed=0,
        evaluation=Sequential(first_look=32, stages=(0.5,), min_curves=2, stage_samples=96, screen=False),
    )
    total = planned_steps(finetune)
    stopped = [t for t in result.trials if t.fidelity == "stopped"]
    full = [t for t in result.trials if t.fidelity == "full"]
    assert stopped, "random plans with up to 99.5% sparsity and a weak fine-tune include hopeless ones"
    assert len(full) >= 2  # calibration came first
    for t in stopped:
        assert t.state == "COMPLETE" and not t.feasible  # told as infeasible: never the answer
        # half the fine-tune; one stage look, and an untuned look while curves are still recorded
        assert t.finetune_steps == total // 2 and t.val_samples in (96, 2 * 96)
    for t in full:
        assert t.finetune_steps == total
    assert result.best_trial is None or result.best_trial.fidelity == "full"
    acc = result.accounting
    assert acc["val_samples"] == evaluate.samples_evaluated
    by = acc["cost_by_fidelity"]
    assert by["stopped"]["trials"] == len(stopped) and by["stopped"]["finetune_steps"] == len(stopped) * (total // 2)
    assert acc["finetune_steps"] == sum(t.finetune_steps for t in result.trials)
    assert acc["finetune_steps"] < total * len(result.trials)  # the stops saved fine-tuning


def test_completed_candidates_store_their_curve(mlp, digits, tmp_path):
    finetune = tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3)
    tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Compose([Prune(sparsity=(0.0, 0.9))]),
        constraint=tightfit.MaxDrop(0.02),
        finetune=finetune,
        budget=3,
        search="random",
        seed=1,
        run_dir=tmp_path / "run",
        evaluation=Sequential(stages=(1 / 3, 2 / 3), stage_samples=64, screen=False),
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    curves = [Curve.from_dict(t.user_attrs[CURVE_ATTR]) for t in study.get_trials() if CURVE_ATTR in t.user_attrs]
    assert len(curves) == 3
    for c in curves:
        assert c.total_steps == planned_steps(finetune) and c.samples == 64 and len(c.stages) == 2


def test_screened_candidates_get_a_calibrated_prediction():
    from tightfit.evaluation.stages import tuned_prediction

    curves = [
        Curve(90, 64, ((0.1,),), (0.0,), ((0.01,),), untuned=(0.3,)),
        Curve(90, 64, ((0.1,),), (0.05,), ((0.01,),), untuned=(0.15,)),
    ]  # whole fine-tune gave 0.3 and 0.1
    assert tuned_prediction([0.25], curves, min_curves=2) == pytest.approx((0.05,))  # minus the mean gain
    assert tuned_prediction([0.25], curves, min_curves=3) is None
    assert tuned_prediction([0.25], [Curve(90, 64, ((0.1,),), (0.0,), ((0.01,),))] * 3, min_curves=1) is None


# --- successive promotion: fine-tune on only while the candidate is likely to end feasible ------------


def test_feasible_probability_from_the_curves_gains():
    from tightfit.evaluation.stages import feasible_probability, tuned_prediction_spread

    # gains 0.06, 0.03, 0.03: mean 0.04, sample variance 3e-4, predictive variance 3e-4 * (1 + 1/3)
    at_mean = feasible_probability([0.04], [0.0], CURVES, 0, min_curves=3)
    assert at_mean.probability == pytest.approx(0.5) and at_mean.predicted == pytest.approx((0.0,), abs=1e-12)
    assert at_mean.sd == pytest.approx((0.02,))
    high = feasible_probability([0.10], [0.0], CURVES, 0, min_curves=3)
    assert high.predicted == pytest.approx((0.06,)) and high.probability == pytest.approx(
        0.00135, abs=1e-4
    )  # three sds
    # the candidate's own noise widens the prediction: a worse estimate keeps more chance
    noisy = feasible_probability([0.10], [0.05], CURVES, 0, min_curves=3)
    assert noisy.probability > 0.1 and noisy.sd[0] == pytest.approx((0.05**2 + 0.02**2) ** 0.5)
    # every constraint must be met: probabilities multiply
    two = [Curve(90, 128, ((g, g),), (0.0, 0.0), ((0.0, 0.0),)) for g in (0.06, 0.03, 0.03)]
    assert feasible_probability([0.04, 0.04], [0.0, 0.0], two, 0, min_curves=3).probability == pytest.approx(0.25)
    # not before min_curves (and never from fewer than two: no spread to go by)
    assert feasible_probability([0.04], [0.0], CURVES, 0, min_curves=4) is None
    assert feasible_probability([0.04], [0.0], CURVES[:1], 0, min_curves=1) is None
    # a screen's prediction spreads as the whole fine-tune's gains did (0.3 and 0.1)
    screened = [
        Curve(90, 64, ((0.1,),), (0.0,), ((0.01,),), untuned=(0.3,)),
        Curve(90, 64, ((0.1,),), (0.05,), ((0.01,),), untuned=(0.15,)),
    ]
    assert tuned_prediction_spread(screened) == pytest.approx((0.03**0.5,))  # sample variance 0.02, times 1 + 1/2
    assert tuned_prediction_spread(screened[:1]) is None


def test_a_candidate_passed_over_is_told_as_infeasible():
    from tightfit.run.sequential import told_infeasible

    assert told_infeasible((0.02, -0.01)) == (0.02, -0.01)  # already reads as infeasible
    assert told_infeasible((-0.03, -0.01)) == (-0.03, 1e-9)  # each met, together unlikely: the closest is broken


@pytest.mark.slow
@pytest.mark.parametrize("promote", [0.0, 0.9])
def test_search_promotes_only_likely_candidates(mlp, digits, tmp_path, promote):
    finetune = tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3)
    result = tightfit.compress(
        mlp,
        evaluate=tightfit.Accuracy(digits.loader("val", 512)),
        strategy=Compose([Prune(sparsity=(0.0, 0.98))]),
        constraint=tightfit.MaxDrop(0.01),
        finetune=finetune,
        budget=10,
        search="random",
        seed=3,
        run_dir=tmp_path / "run",
        evaluation=Sequential(stages=(0.5,), min_curves=2, stage_samples=96, screen=False, promote_probability=promote),
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    reasons = {
        t.number: t.user_attrs.get("stop_reason")
        for t in study.get_trials()
        if t.user_attrs.get("fidelity") == "stopped"
    }
    if promote == 0.0:
        assert "unpromising" not in reasons.values()  # only the surely-infeasible rule stops
    else:
        assert "unpromising" in reasons.values()
        for t in study.get_trials():
            looks = [e for e in t.user_attrs.get("evaluations", []) if e.get("level") == "stage"]
            for look in looks:  # every stage look of a calibrated run states the probability it acted on
                if look["p_feasible"] is not None and look["stop_reason"] is None:
                    assert look["p_feasible"] >= promote
        for number in reasons:
            t = study.trials[number]
            assert t.state == optuna.trial.TrialState.COMPLETE and max(t.constraints.values()) > 0  # told infeasible
            # the search reads the prediction at the stage look's noise, the final pick at its spread
            look = [e for e in t.user_attrs["evaluations"] if e.get("level") == "stage"][-1]
            assert t.user_attrs["metric_se"] == pytest.approx(max(look["se"]))
            if reasons[number] == "unpromising":
                assert t.user_attrs["prediction_se"] > t.user_attrs["metric_se"]
    assert result.best_trial is None or result.best_trial.fidelity == "full"
