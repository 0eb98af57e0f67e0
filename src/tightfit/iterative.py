"""Iterative prune-and-adjust (OLMP's outer loop), made of tightfit's search and recoveries.

Each round searches per-layer pruning thresholds on the current model *without training* (cheap:
an evaluation is a prune and a validation pass), allowing the untrained plan to lose up to
``step`` of the metric; then ``adjust`` (a recovery, e.g. :class:`~tightfit.recovery.GradualPrune`)
trains that plan. A round whose adjusted model falls more than ``max_drop`` below the original is
undone, and the next round takes a step half as large. Rounds continue up to ``rounds``; the
answer is the last accepted model, chosen on ``evaluate`` (validation data), never on test.

Compared with one ``compress`` call, the compression grows in stages and every stage is
re-trained before the next is planned: on LeNet-300-100 / digits this reaches about 3-4x the
compression of iterative magnitude pruning at the same training epochs (docs/benchmarks.md).

With ``run_dir`` nothing finished is lost: each round's search is an ordinary ``compress`` run
directory (``round-01/``...; an interrupted search resumes there); a finished adjust is kept in it
(``adjusted.tfz`` and ``adjusted.json``: plan, training steps) until the round is recorded; then the
rounds so far (``rounds.json``) and the accepted model (``model.tfz``) are written atomically.
Calling again with the same arguments continues where the run stopped: a finished adjust is not
trained again, an interrupted one is started over (and only it), and the result is an
uninterrupted run's (every round's search and adjust are seeded by the round number).
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ._io import write_atomic
from .errors import ConfigError
from .operators import Compose, Operator, Plan, Prune, apply


@dataclass(frozen=True)
class AdjustRound:
    """One round: the search's plan, and what training it gave."""

    number: int
    step: float  #: how much the untrained plan was allowed to lose
    plan: Plan
    nonzero_ratio: float  #: prunable weights of the original / nonzeros after adjusting
    metric: float  #: after adjusting
    accepted: bool
    training_steps: int | None
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(
            number=self.number,
            step=self.step,
            plan=self.plan.to_dict(),
            nonzero_ratio=self.nonzero_ratio,
            metric=self.metric,
            accepted=self.accepted,
            training_steps=self.training_steps,
            wall_s=self.wall_s,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdjustRound:
        return cls(**{**data, "plan": Plan.from_dict(data["plan"])})


ROUNDS_FILE = "rounds.json"
MODEL_FILE = "model.tfz"  # the answer: the last accepted round's model
ADJUSTED_FILE = "adjusted.tfz"  # in round-NN/: that round's adjusted model, if it was accepted (or is not recorded yet)
ADJUST_RECORD_FILE = "adjusted.json"  # in round-NN/, until rounds.json records the round: its finished adjust


@dataclass(frozen=True)
class _Adjusted:
    """A round's finished adjust, before its model is measured: enough to go on without training again."""

    plan: Plan
    model: bytes  #: the adjusted model's .tfz bytes
    training_steps: int | None
    wall_s: float  #: the round's search and adjust


@dataclass
class PruneAdjustResult:
    """The last accepted model (the original if no round was accepted) and every round."""

    model: nn.Module
    plan: Plan | None
    baseline_metric: float
    metric: float
    nonzero_ratio: float
    rounds: list[AdjustRound] = field(default_factory=list)
    _file: bytes | None = field(default=None, repr=False)  #: the answer's .tfz bytes, as measured

    @property
    def training_steps(self) -> int:
        """Optimizer steps of every adjust, the undone rounds included."""
        return sum(r.training_steps or 0 for r in self.rounds)

    @property
    def size_bytes(self) -> int | None:
        """Bytes of the answer's ``.tfz`` file (None if no round was accepted)."""
        return None if self._file is None else len(self._file)

    def save(self, path: str | Path) -> int:
        """Write the answer as a ``.tfz`` file (``tightfit.load`` reads it); returns its bytes."""
        if self._file is None:
            raise ConfigError("PruneAdjustResult.save: no round was accepted, so there is no compressed model to save.")
        write_atomic(path, self._file)
        return len(self._file)


def prune_and_adjust(
    model: nn.Module,
    *,
    evaluate: Callable[[nn.Module], float],
    adjust: Callable[[nn.Module], None],
    max_drop: float = 0.005,
    rounds: int = 7,
    step: float = 0.4,
    strategy: Operator | Compose | None = None,
    search: str = "olmp",
    search_budget: int = 30,
    example_input: Any = None,
    seed: int = 0,
    on_round: Callable[[AdjustRound], None] | None = None,
    run_dir: str | os.PathLike | None = None,
) -> PruneAdjustResult:
    """Prune ``model`` in rounds of search (no training) and ``adjust`` (training); see the module doc.

    ``evaluate(model) -> float`` is a higher-is-better validation metric; ``max_drop`` is how far
    below the original's value the answer may fall (0.005 = half a point of accuracy). ``step`` is
    the first round's allowance for the *untrained* plan (it is halved after an undone round).
    ``strategy`` defaults to ``Prune(sparsity=(0.0, 0.999))``; it must only prune, since every
    round starts from the previous round's weights. ``model`` is not modified. ``run_dir`` keeps
    every finished round on disk and resumes from it (module doc); a larger ``rounds`` on a later
    call continues a finished run.
    """
    from .measure.analysis import analyze, count_nonzeros
    from .search.requirements import check_requirements

    strategy, operators = _checked(rounds, step, max_drop, adjust, strategy)
    check_requirements(search, strategy)  # before the baseline: olmp needs cma
    names = [layer.name for layer in analyze(model).layers]
    _, total = count_nonzeros(model, names)
    baseline = float(evaluate(model))
    settings = _settings(
        operators, max_drop=max_drop, step=step, search=(search, search_budget, seed), baseline=baseline
    )
    with _RoundsFile.open(run_dir, settings) as saved:
        history, exhausted = saved.rounds, saved.exhausted
        current, data, plan, metric, ratio = _resumed(saved, model, baseline)
        step = _next_step(history, step)
        for number in range(len(history) + 1, rounds + 1):
            if exhausted:
                break
            trained = saved.adjusted(number)  # an earlier call finished this round's adjust: not trained again
            if trained is None:
                trained = _search_and_adjust(
                    current,
                    evaluate=evaluate,
                    adjust=adjust,
                    strategy=strategy,
                    min_metric=baseline - step,
                    search=search,
                    search_budget=search_budget,
                    example_input=example_input,
                    seed=seed * 1000 + number,
                    run_dir=saved.round_dir(number),
                )
                if trained is None:
                    # not even the gentlest plan keeps the metric within the step: nothing left to prune
                    exhausted = True
                    saved.write(history, exhausted, None)
                    break
                saved.write_adjusted(number, trained)
            record, adjusted = _measured_round(
                number, step, trained, model, evaluate, (names, total), baseline=baseline, max_drop=max_drop
            )
            history.append(record)
            if record.accepted:
                current, data, plan = adjusted, trained.model, trained.plan
                metric, ratio = record.metric, record.nonzero_ratio
            else:
                step /= 2  # undo the round: the next one takes a smaller step
            saved.write(history, exhausted, trained.model if record.accepted else None)
            if on_round is not None:
                on_round(record)
    answer = current if current is not model else copy.deepcopy(model)
    return PruneAdjustResult(answer, plan, baseline, metric, ratio, history, data)


def _resumed(
    saved: _RoundsFile, model: nn.Module, baseline: float
) -> tuple[nn.Module, bytes | None, Plan | None, float, float]:
    """(model, its .tfz bytes, plan, metric, nonzero ratio) to continue from: the last accepted
    round's when the run directory holds one, else the original's."""
    from .export.artifact import load_model

    if saved.model_bytes is None:
        return model, None, None, baseline, 1.0
    data = saved.model_bytes  # resume from the last accepted round
    last = next(r for r in reversed(saved.rounds) if r.accepted)
    return load_model(io.BytesIO(data), model), data, last.plan, last.metric, last.nonzero_ratio


def _settings(
    operators: list[Operator], *, max_drop: float, step: float, search: tuple[str, int, int], baseline: float
) -> dict[str, Any]:
    """The run's settings as rounds.json records them (a resumed run must have the same)."""
    method, budget, seed = search
    return dict(
        max_drop=max_drop,
        step=step,
        strategy=[op.config() | {"name": op.name} for op in operators],
        search=method,
        search_budget=budget,
        seed=seed,
        baseline_metric=baseline,
    )


def _next_step(rounds: list[AdjustRound], step: float) -> float:
    """The allowance of the round after ``rounds``: the last round's, halved if it was undone."""
    for r in rounds:
        step = r.step if r.accepted else r.step / 2
    return step


def _measured_round(
    number: int,
    step: float,
    trained: _Adjusted,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    layers: tuple[list[str], int],
    *,
    baseline: float,
    max_drop: float,
) -> tuple[AdjustRound, nn.Module]:
    """The round's record (accepted when the metric stays within ``max_drop`` of the baseline) and
    its model, reloaded from the saved bytes so that it is measured as it was saved."""
    from .export.artifact import load_model
    from .measure.analysis import count_nonzeros

    names, total = layers
    start = time.perf_counter()
    adjusted = load_model(io.BytesIO(trained.model), model)  # measured as it was saved
    value = float(evaluate(adjusted))
    nonzeros, _ = count_nonzeros(adjusted, names)
    accepted = baseline - value <= max_drop + 1e-12
    record = AdjustRound(
        number,
        step,
        trained.plan,
        total / max(1, nonzeros),
        value,
        accepted,
        trained.training_steps,
        trained.wall_s + time.perf_counter() - start,
    )
    return record, adjusted


def load_rounds(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[AdjustRound], bool]:
    """The settings, the finished rounds and whether the rounds ran out of plans (``exhausted``)
    that a ``prune_and_adjust`` run directory holds."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} holds no prune-and-adjust run (no {ROUNDS_FILE}).")
    stored = json.loads(path.read_text())
    return stored["settings"], [AdjustRound.from_dict(r) for r in stored["rounds"]], stored["exhausted"]


class _RoundsFile:
    """``rounds.json`` and ``model.tfz`` in a run directory (or nothing, without one)."""

    def __init__(self, root: Path | None, settings: dict[str, Any]) -> None:
        self.root, self.settings = root, settings
        self.rounds: list[AdjustRound] = []
        self.exhausted = False
        self.model_bytes: bytes | None = None
        if root is None:
            return
        if not (root / ROUNDS_FILE).exists():
            # written before any work, so a round left unfinished is resumed only with the same settings
            self.write([], False, None)
            return
        stored_settings, self.rounds, self.exhausted = load_rounds(root)
        settings = json.loads(json.dumps(settings))  # as stored (tuples become lists)
        changed = sorted(k for k in settings if stored_settings.get(k) != settings[k])
        if changed:
            raise ConfigError(
                f"prune_and_adjust: `run_dir` {str(root)!r} holds a run with other settings ({', '.join(changed)} "
                "differ); call with the same model and arguments to resume it, or use another run_dir."
            )
        accepted = [r.number for r in self.rounds if r.accepted]
        if accepted:
            self.model_bytes = (self._round_path(accepted[-1]) / ADJUSTED_FILE).read_bytes()

    @classmethod
    @contextmanager
    def open(cls, run_dir: str | os.PathLike | None, settings: dict[str, Any]) -> Iterator[_RoundsFile]:
        if run_dir is None:
            yield cls(None, settings)
            return
        from .run_dir import RunDir

        with RunDir.open(run_dir) as held:  # the lock: one process per run directory
            yield cls(held.path, settings)

    def round_dir(self, number: int) -> Path | None:
        return None if self.root is None else self._round_path(number)

    def _round_path(self, number: int) -> Path:
        """Round ``number``'s directory; only with a run directory (the callers check ``root``)."""
        assert self.root is not None
        return self.root / f"round-{number:02d}"

    def adjusted(self, number: int) -> _Adjusted | None:
        """Round ``number``'s adjust, if a call finished it but stopped before the round was recorded."""
        if self.root is None or not (self._round_path(number) / ADJUST_RECORD_FILE).exists():
            return None
        stored = json.loads((self._round_path(number) / ADJUST_RECORD_FILE).read_text())
        model = (self._round_path(number) / ADJUSTED_FILE).read_bytes()
        return _Adjusted(Plan.from_dict(stored["plan"]), model, stored["training_steps"], stored["wall_s"])

    def write_adjusted(self, number: int, trained: _Adjusted) -> None:
        if self.root is None:
            return
        # the model first: the record never names a model not on disk
        write_atomic(self._round_path(number) / ADJUSTED_FILE, trained.model)
        record = dict(plan=trained.plan.to_dict(), training_steps=trained.training_steps, wall_s=trained.wall_s)
        write_atomic(self._round_path(number) / ADJUST_RECORD_FILE, json.dumps(record, indent=1).encode())

    def write(self, rounds: list[AdjustRound], exhausted: bool, accepted_model: bytes | None) -> None:
        """Record ``rounds``; ``accepted_model`` (the last round's, already in its round directory) is the answer."""
        if self.root is None:
            return
        text = json.dumps(
            dict(settings=self.settings, rounds=[r.to_dict() for r in rounds], exhausted=exhausted), indent=1
        )
        write_atomic(self.root / ROUNDS_FILE, text.encode())
        if accepted_model is not None:
            write_atomic(self.root / MODEL_FILE, accepted_model)
        if rounds:  # recorded now: the round's own record goes, and an undone round's model with it
            last = self._round_path(rounds[-1].number)
            (last / ADJUST_RECORD_FILE).unlink(missing_ok=True)
            if not rounds[-1].accepted:
                (last / ADJUSTED_FILE).unlink(missing_ok=True)


def _checked(
    rounds: int, step: float, max_drop: float, adjust: Any, strategy: Operator | Compose | None
) -> tuple[Operator | Compose, list[Operator]]:
    """prune_and_adjust's arguments checked; the strategy (default: magnitude pruning) and its operators."""
    if rounds < 1:
        raise ConfigError(f"prune_and_adjust: `rounds` must be >= 1, but got {rounds!r}.")
    if not step > 0:
        raise ConfigError(
            f"prune_and_adjust: `step` must be > 0 (the metric an untrained plan may lose), but got {step!r}."
        )
    if max_drop < 0:
        raise ConfigError(f"prune_and_adjust: `max_drop` must be >= 0, but got {max_drop!r}.")
    if not callable(adjust):
        raise ConfigError("prune_and_adjust: `adjust` must be a recovery, e.g. GradualPrune(train_loader, epochs=30).")
    strategy = strategy or Prune(sparsity=(0.0, 0.999))
    operators = list(strategy) if isinstance(strategy, Compose) else [strategy]
    if any(op.name != "prune" for op in operators):
        raise ConfigError(
            "prune_and_adjust: `strategy` may only prune (e.g. Prune(sparsity=(0, 0.999))); each round "
            "starts from the previous round's weights."
        )
    return strategy, operators


def _search_and_adjust(
    current: nn.Module,
    *,
    evaluate: Callable[[nn.Module], float],
    adjust: Callable[[nn.Module], None],
    strategy: Operator | Compose,
    min_metric: float,
    search: str,
    search_budget: int,
    example_input: Any,
    seed: int,
    run_dir: Path | None,
) -> _Adjusted | None:
    """One round's search (a ``compress`` run, no training) and adjust (training, seeded per round:
    reruns repeat); None when no plan keeps the metric within the step."""
    from .evaluation.constraints import MinMetric
    from .export.artifact import to_bytes
    from .run import Run, Settings

    start = time.perf_counter()
    settings = Settings.of(
        evaluate=evaluate,
        strategy=strategy,
        constraint=MinMetric(min_metric),
        objective="nonzeros",
        budget=search_budget,
        search=search,
        example_input=example_input,
        seed=seed,
        run_dir=run_dir,
        # the smallest plan that measured within the step: the adjusted model's own
        # check against max_drop is what guards the answer
        pick="observed",
    )
    found = Run(current, settings).compress()
    if not found.feasible:
        return None
    assert found.plan is not None  # a feasible result holds its plan
    candidate = apply(found.plan, current)
    _keep_zeros(candidate)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adjust(candidate)
    return _Adjusted(
        found.plan, to_bytes(candidate, found.plan), getattr(adjust, "steps_taken", None), time.perf_counter() - start
    )


@torch.no_grad()
def _keep_zeros(candidate: nn.Module) -> None:
    """Weights an earlier round pruned are exact zeros; a plan gentler than that round's on some
    layer would unmask them and training would grow them back. Mask them again."""
    from .operators.prune import WeightMask
    from .recovery import sites

    for site in sites(candidate):
        for step in site.chain:
            if isinstance(step, WeightMask):
                mask = cast(torch.Tensor, step.mask)  # a buffer: Module.__getattr__ says Tensor | Module
                mask.mul_((site.original != 0).to(mask.dtype))


__all__ = ["AdjustRound", "PruneAdjustResult", "load_rounds", "prune_and_adjust"]
