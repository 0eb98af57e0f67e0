"""``tightfit compress-once CONFIG``: :func:`tightfit.compress_once` from a run's config (no search,
no training): the model, ``[evaluate]``, a ``[[strategy]]`` of fixed settings, ``[calibration]`` and
``[compress_once] repair``. The model is evaluated before and after, checked against ``[constraint]``
when the config has one, and written to ``RUN_DIR/compress-once/`` (``model.tfz``, ``once.json``,
``example_input.pt`` for ``tightfit export``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: what ``tightfit compress-once`` writes beside ``model.tfz`` (JSON; ``tightfit report`` reads it)
ONCE_FILE = "once.json"


@dataclass
class OnceReport:
    """What one-shot compression did and measured (``once.json``). Sizes: ``baseline_size_bytes``
    is ``torch.save(state_dict)``'s bytes, ``size_bytes`` the ``.tfz`` file's; ``bits_per_weight``
    is ``size_bytes x 8 / weight_params`` (what ``MaxBits`` bounds)."""

    baseline_metric: float
    metric: float
    baseline_size_bytes: int
    size_bytes: int
    weight_params: int
    nonzeros: int
    flops: int | None = None
    baseline_flops: int | None = None
    #: each [constraint]: (its description, its value (<= 0: met), met)
    constraints: list[tuple[str, float, bool]] = field(default_factory=list)
    calibration: str | None = None  # the calibration batches' digest
    repaired: dict[str, list[str]] = field(default_factory=dict)
    uncalibrated: dict[str, str] = field(default_factory=dict)
    not_fitted: dict[str, str] = field(default_factory=dict)  # target="original" layers that could not be fit
    left_alone: dict[str, str] = field(default_factory=dict)
    calibration_passes: int = 0
    seconds: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""

    @property
    def bits_per_weight(self) -> float:
        return self.size_bytes * 8 / max(1, self.weight_params)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bits_per_weight": self.bits_per_weight}


def compress_once_run(arguments: dict[str, Any]) -> OnceReport:
    """Compress once, evaluate before and after, check the constraints, write the run directory."""
    from .. import compress_once, save
    from .._io import write_text_atomic
    from ..run.settings import describe_calibration
    from ..run_dir import RunDir

    a = arguments
    model, evaluate = a["model"], a["evaluate"]
    done = compress_once(model, a["strategy"], a["calibration"], example_input=a["example_input"], repair=a["repair"])
    run_dir = Path(a["run_dir"])
    with RunDir.open(run_dir) as held:
        size = save(done.model, run_dir / "model.tfz", plan=done.plan)
        if a["example_input"] is not None:
            held.write_example_input(a["example_input"])  # `tightfit export` checks outputs on it
        report = _measure(model, done, size, evaluate, a)
        report.calibration = describe_calibration(a["calibration"]) if a["calibration"] is not None else None
        report.run_dir = str(run_dir)
        write_text_atomic(run_dir / ONCE_FILE, json.dumps(report.to_dict(), indent=2))
    return report


def _measure(model: Any, done: Any, size: int, evaluate: Any, a: dict[str, Any]) -> OnceReport:
    """The metric, file bytes, nonzeros (and FLOPs for MaxFlops) before and after, and the constraints."""
    from ..evaluation import MaxFlops
    from ..measure.analysis import count_nonzeros, sparse_flops
    from ..records import Measurement
    from ..run.measuring import float32_file_bytes

    names = list(done.plan.layers)
    base_nonzeros, weights = count_nonzeros(model, names)
    nonzeros, _ = count_nonzeros(done.model, names)
    counted = any(isinstance(c, MaxFlops) for c in a["constraints"])
    flops = sparse_flops(done.model, a["example_input"], names) if counted else None
    base_flops = sparse_flops(model, a["example_input"], names) if counted else None
    report = OnceReport(
        baseline_metric=float(evaluate(model)),
        metric=float(evaluate(done.model)),
        baseline_size_bytes=float32_file_bytes(model),
        size_bytes=size,
        weight_params=weights,
        nonzeros=nonzeros,
        flops=flops,
        baseline_flops=base_flops,
        repaired=done.repaired,
        uncalibrated=done.uncalibrated,
        not_fitted=done.not_fitted,
        left_alone=done.left_alone,
        calibration_passes=done.calibration_passes,
        seconds=done.seconds,
        plan=done.plan.to_dict(),
    )
    measured = Measurement(report.metric, size, nonzeros, weights, flops)
    baseline = Measurement(report.baseline_metric, report.baseline_size_bytes, base_nonzeros, weights, base_flops)
    for constraint in a["constraints"]:
        value = float(constraint.value(measured, baseline))
        report.constraints.append((constraint.describe(), value, value <= 0))
    return report


def load_once(run_dir: Path) -> dict[str, Any]:
    """``once.json`` of a compress-once run directory, as stored (JSON; shown as data)."""
    try:
        data = json.loads((run_dir / ONCE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir / ONCE_FILE}: cannot be read as tightfit's JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{run_dir / ONCE_FILE} does not hold what tightfit writes (not a JSON object).")
    return data
