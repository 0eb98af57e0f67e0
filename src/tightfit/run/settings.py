"""The settings of one run: ``compress``'s keyword arguments, in one frozen dataclass, checked
before any work (a bad one is a ConfigError naming the argument and what to give)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from optuna.storages import BaseStorage
from torch import nn

from ..errors import ConfigError
from ..evaluation.constraints import RESOURCE_CONSTRAINTS, Constraint, MaxDrop, MaxFlops, MaxLatency
from ..evaluation.sequential import Sequential
from ..measure.latency import Latency
from ..operators.base import Operator
from ..operators.calibrated import calibration_batches
from ..operators.compose import Compose, as_strategy
from ..operators.prune import Prune
from ..operators.quantize import Quantize
from ..search.requirements import check_requirements

OBJECTIVES = ("size", "nonzeros", "flops", "latency", "metric")
#: what ``objective="metric"`` may search with: the other methods model a positive objective that
#: falls as plans compress (BO fits its logarithm; the level-set and pattern searches walk toward
#: smaller plans), which the metric is not
METRIC_SEARCHES = ("auto", "tpe", "warm-tpe", "random", "gp", "cmaes", "nsga2")
#: how compress chooses its answer among the feasible trials (see tightfit.run.finish.final_pick)
PICKS = ("posterior", "observed")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``tightfit.compress``'s keyword arguments (see its docstring); the one place their names,
    types and defaults are written. :meth:`of` builds it from keywords, :class:`Checked` derives
    what a run needs from it."""

    evaluate: Callable[[nn.Module], float]
    strategy: Compose | Operator | None = None
    constraint: Constraint | Sequence[Constraint] | None = None
    objective: str | tuple[str, str] = "size"
    finetune: Callable[[nn.Module], None] | None = None
    budget: int = 30
    search: str = "auto"
    example_input: Any = None
    seed: int = 0
    run_dir: str | os.PathLike | None = None
    storage: str | BaseStorage | None = None
    study_name: str = "tightfit"
    progress: bool = False
    artifact_extra: dict[str, Any] | None = None
    on_start: Callable[[str, str], None] | None = None
    latency: Latency | None = None
    evaluation: Sequential | None = None
    pick: str = "posterior"
    calibration: Any = None
    recover: Callable[[nn.Module], None] | None = None
    recover_top: int = 1
    search_constraint: Constraint | Sequence[Constraint] | None = None

    @classmethod
    def of(cls, **keywords: Any) -> Settings:
        """Settings from ``compress``'s keywords; an unknown or missing one is a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise ConfigError(
                f"got an unexpected keyword argument {unknown[0]!r} (the arguments are tightfit.compress's: "
                f"{', '.join(sorted(names))})."
            )
        if "evaluate" not in keywords:
            raise ConfigError(
                "missing a required keyword-only argument: 'evaluate' (the arguments are tightfit.compress's)."
            )
        return cls(**keywords)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The keywords (shallow: the objects given, not copies)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Checked:
    """What a run derives from its settings once they are checked: the model to compress (the
    module a ``torch.compile`` wrapper holds), the objective's name, whether it is a Pareto run,
    the strategy, the constraints and the latency meter."""

    settings: Settings
    model: nn.Module
    compiled: bool
    objective: str
    multi: bool
    strategy: Compose
    constraints: list[Constraint]
    latency: Latency | None
    #: the calibration batches, read once in order (None when no operator of the strategy needs them)
    calibration: list[Any] | None = None
    #: what the answer must meet after ``recover=`` when the search is held to ``search_constraint``
    #: (``constraints`` are then the search's); None: the same as ``constraints``
    final_constraints: list[Constraint] | None = None
    #: calibration batches the search's probes may read (objective="metric"'s warm start): the
    #: calibration, also when no operator needs it
    probe_inputs: list[Any] | None = None

    @property
    def answer_constraints(self) -> list[Constraint]:
        return self.final_constraints if self.final_constraints is not None else self.constraints


def check(model: nn.Module, settings: Settings) -> Checked:
    """Every argument checked, in the order ``compress`` always checked them, before any work."""
    s = settings
    check_arguments(model, s.evaluate, s.objective, s.budget, s.example_input, s.finetune, s.seed)
    check_evaluation(s.evaluation)
    compiled = compiled_original(model)
    if compiled is not None:  # torch.compile's wrapper: compress what it wraps (each copy would recompile)
        model = compiled
    if s.pick not in PICKS:
        raise ConfigError(f"`pick` must be one of {PICKS}, but got {s.pick!r}.")
    # ("size", "metric"): a Pareto front of the first objective (minimized) and the metric
    # (maximized); the constraints still decide which plans count.
    multi = not isinstance(s.objective, str)
    if multi and s.evaluation is not None:
        raise ConfigError(
            "`evaluation=Sequential(...)` works with one objective; a Pareto objective "
            f"{tuple(s.objective)!r} needs every candidate measured in full (evaluation=None)."
        )
    objective = s.objective[0] if multi else s.objective
    strategy = as_strategy(s.strategy if s.strategy is not None else Compose([Prune(), Quantize()]))
    calibration = calibration_for(strategy, s.calibration)
    constraints = constraint_list(s.constraint)
    check_resource_budget(s, objective, multi, constraints)
    check_recover(s, multi)
    final = None
    if s.search_constraint is not None:  # the search's own (looser) constraints; recovery must meet `constraint`
        final, constraints = constraints, constraint_list(s.search_constraint, "search_constraint")
        check_resource_budget(s, objective, multi, constraints)
    check_requirements(s.search, strategy, s.latency)  # known method; optional packages installed
    latency = latency_for(s.latency, objective, constraints, s.example_input)
    if s.evaluation is not None and latency is not None:
        raise ConfigError(
            "evaluation=Sequential(...) does not time candidates yet: drop the latency objective / MaxLatency / "
            "`latency`, or use evaluation=None."
        )
    probe_inputs = calibration
    if probe_inputs is None and s.calibration is not None and objective == "metric":
        probe_inputs = calibration_batches(s.calibration, strategy)
    args = (s, model, compiled is not None, objective, multi, strategy, constraints, latency, calibration)
    return Checked(*args, final_constraints=final, probe_inputs=probe_inputs)


def check_recover(s: Settings, multi: bool) -> None:
    if s.recover is None:
        if s.recover_top != 1:
            raise ConfigError("`recover_top` needs `recover=` (e.g. recover=tightfit.FineTune(train_loader)).")
        if s.search_constraint is not None:
            raise ConfigError(
                "`search_constraint` is what a search without training is held to before `recover=` trains the "
                "best plans to meet `constraint`: it needs `recover=` (e.g. recover=tightfit.FineTune(train_loader))."
            )
        return
    if not callable(s.recover):
        raise ConfigError("`recover` must be None, tightfit.FineTune(...), or a callable(model) -> None.")
    if not isinstance(s.recover_top, int) or isinstance(s.recover_top, bool) or s.recover_top < 1:
        raise ConfigError(f"`recover_top` must be a whole number of plans >= 1, but got {s.recover_top!r}.")
    if multi:
        raise ConfigError(
            "`recover=` recovers the chosen plan(s) after the search; it works with one objective, not a Pareto "
            "objective."
        )


def check_resource_budget(s: Settings, objective: str, multi: bool, constraints: list[Constraint]) -> None:
    """``objective="metric"`` (the most accurate plan within a resource budget) needs a budget to
    meet, a search that can maximize a metric, and full evaluations; MaxFlops needs an input."""
    if any(isinstance(c, MaxFlops) for c in constraints) and s.example_input is None:
        raise ConfigError("MaxFlops needs `example_input` (the input FLOPs are counted on).")
    if objective != "metric":
        return
    if multi:
        raise ConfigError(
            "`objective=('metric', ...)` is not a Pareto pair; give objective='metric' or ('size', 'metric')."
        )
    if not any(isinstance(c, RESOURCE_CONSTRAINTS) for c in constraints):
        raise ConfigError(
            "`objective='metric'` maximizes the metric within a resource budget, but `constraint` holds none, so "
            "the original would always win: give MaxSize(bytes), MaxBits(bits_per_weight), MaxFlops(flops) or "
            "MaxLatency(ms), e.g. constraint=tightfit.MaxBits(4.5)."
        )
    if s.search not in METRIC_SEARCHES:
        raise ConfigError(f"`objective='metric'` searches with one of {METRIC_SEARCHES}, but got search={s.search!r}.")
    if s.evaluation is not None:
        raise ConfigError(
            "`evaluation=Sequential(...)` screens plans by an objective known before evaluation; with "
            "objective='metric' give evaluation=None."
        )


def calibration_for(strategy: Compose, calibration: Any) -> list[Any] | None:
    """The calibration batches of a strategy with calibrated operators (GPTQ, Wanda, SparseGPT), as a
    list read once (a generator too), so every trial, a resumed run's replay and a worker feed the
    same batches in the same order; None when no operator needs them. Calibrated operators without
    ``calibration`` are refused: it is not taken from the evaluation's loader, because fitting the
    compression to the samples that then judge it would flatter every plan's metric."""
    users = [op for op in strategy if op.needs_calibration()]
    if not users:
        return None
    if calibration is None:
        raise ConfigError(
            f"{', '.join(repr(op) for op in users)} need(s) `calibration=`: model inputs the operators learn from "
            "(a few hundred samples, not the validation data that judges the plans), e.g. "
            "calibration=tightfit.evaluation.loader_inputs(train_loader, max_samples=256); or search with "
            "method='rtn' / 'magnitude'."
        )
    return calibration_batches(calibration, strategy)


def check_arguments(model, evaluate, objective, budget, example_input, finetune, seed) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            "`model` is a TorchScript module (torch.jit.script / torch.jit.trace); compression adds "
            "parametrizations to layers, which a ScriptModule cannot take. Pass the nn.Module it was made from, "
            "and script the result (tightfit export --format torchscript)."
        )
    if not callable(evaluate):
        raise ConfigError(
            "`evaluate` must be a callable(model) -> float (higher is better), e.g. tightfit.Accuracy(val_loader)."
        )
    pareto = isinstance(objective, (tuple, list)) and len(objective) == 2 and objective[1] == "metric"
    primary = objective[0] if pareto else objective
    if primary not in OBJECTIVES:
        raise ConfigError(
            f"`objective` must be one of {OBJECTIVES}, or a pair like ('size', 'metric') for a Pareto front, "
            f"but got {objective!r}."
        )
    if primary in ("flops", "latency") and example_input is None:
        raise ConfigError(
            f'`objective="{primary}"` needs `example_input` (an input tensor, tuple of args or dict of kwargs).'
        )
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"`budget` must be a whole number of evaluations >= 1, but got {budget!r}.")
    if finetune is not None and not callable(finetune):
        raise ConfigError("`finetune` must be None, tightfit.FineTune(...), or a callable(model) -> None.")
    if not isinstance(seed, int):
        raise ConfigError(f"`seed` must be an int, but got {seed!r}.")


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper holds, or None for any other model."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else None


def check_evaluation(evaluation) -> None:
    if evaluation is not None and not isinstance(evaluation, Sequential):
        raise ConfigError(
            f"`evaluation` must be None (every candidate on the full validation set) or tightfit.Sequential(...), "
            f"but got {evaluation!r}."
        )


def tuned_hyperparameters(finetune: Any) -> list:
    """Tuned recovery: a ``finetune`` that declares ``hyperparameters()`` and ``with_settings()``
    has those searched with the plan (see tightfit.recovery.Tuned)."""
    if finetune is None or not (hasattr(finetune, "hyperparameters") and hasattr(finetune, "with_settings")):
        return []
    return list(finetune.hyperparameters())


def constraint_list(constraint: Constraint | Sequence[Constraint] | None, name: str = "constraint") -> list[Constraint]:
    if constraint is None:
        items = [MaxDrop(0.01)]
    elif isinstance(constraint, Constraint):
        items = [constraint]
    elif isinstance(constraint, (list, tuple)) and constraint:
        items = list(constraint)
    else:
        items = [constraint]
    for c in items:
        if not isinstance(c, Constraint):
            raise ConfigError(f"`{name}` must be a tightfit constraint such as MaxDrop(0.005), but got {c!r}.")
    return items


def latency_for(
    latency: Latency | None, objective: str, constraints: list[Constraint], example_input: Any
) -> Latency | None:
    """The latency meter of this run: the one given, or a default one when latency is asked for."""
    if latency is not None:
        if not isinstance(latency, Latency):
            raise ConfigError(
                f"`latency` must be tightfit.Latency(example_input, ...), but got {type(latency).__name__}."
            )
        return latency
    if objective == "latency" or any(isinstance(c, MaxLatency) for c in constraints):
        if example_input is None:
            raise ConfigError(
                "Latency objectives and MaxLatency need `example_input` (or `latency=tightfit.Latency(...)`)."
            )
        return Latency(example_input)
    return None


def describe_calibration(batches: list[Any]) -> str:
    """A fingerprint of the calibration batches (count, and a digest of their tensors in order),
    stored with the run's settings: a resume or a worker fed other batches is refused."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (tuple, list)):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    for batch in batches:
        feed(batch)
    return f"{len(batches)} batches, sha256 {digest.hexdigest()[:16]}"
