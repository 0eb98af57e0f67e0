"""One schema for a trial's stored attributes: TrialAttrs writes what it is given (UNSET fields are
left out, None is written) and reads it back typed; every key is a constant of run_dir."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from tightfit import run_dir
from tightfit.operators import Plan
from tightfit.records import UNSET, Measurement, TrialAttrs


def test_written_attributes_read_back_typed():
    plan = Plan(layers={"0": {"prune": {"sparsity": 0.5}}}, operators={"prune": {"sparsity": [0.0, 0.99]}})
    measured = Measurement(0.9, 1234, 50, 100, flops=7)
    attrs = TrialAttrs(plan=plan, measurement=measured, metric_se=None, fidelity="full", recovery=UNSET)
    stored = attrs.to_user_attrs()
    assert stored == {"plan": plan.to_dict(), "measurement": measured.to_dict(), "metric_se": None, "fidelity": "full"}
    study = optuna.create_study()
    trial = study.ask()
    for key, value in stored.items():
        trial.set_user_attr(key, value)
    back = TrialAttrs.from_trial(study.tell(trial, 1.0))
    assert back.plan.to_dict() == plan.to_dict() and back.measurement == measured
    assert back.fidelity == "full" and back.metric_se is None and back.recovery is None  # absent reads as None


def test_every_key_is_a_run_dir_constant_and_keys_are_distinct():
    keys = [f.metadata["key"] for f in dataclasses.fields(TrialAttrs)]
    constants = {value for name, value in vars(run_dir).items() if name.endswith("_ATTR")}
    assert len(set(keys)) == len(keys) and set(keys) <= constants


@pytest.mark.parametrize(
    "name, field", [("size", "size_bytes"), ("nonzeros", "nonzeros"), ("flops", "flops"), ("latency", "latency_ms")]
)
def test_measurement_objective_reads_the_objectives_field(name, field):
    measured = Measurement(0.5, 1000, 40, 100, flops=300, latency_ms=2.5)
    assert measured.objective(name) == float(getattr(measured, field))
