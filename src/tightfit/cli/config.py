"""The config file of `tightfit run` (TOML), validated before any work starts.

Its keys are the keyword arguments of :func:`tightfit.compress`, one to one; values that are
code (the model factory, data, metric, fine-tuning) are ``package.module:function`` import paths.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..evaluation.sequential import Sequential


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: folders of the configs loaded in this process (their modules are imported from there first)
_CONFIG_DIRS: list[Path] = []


def _import(module_name: str) -> Any:
    """Import ``module_name``; a module a config's folder holds is taken from that folder, even when
    an installed package has its name (the folder is otherwise last on ``sys.path``)."""
    top = module_name.partition(".")[0]
    local = next(
        (d for d in reversed(_CONFIG_DIRS) if (d / f"{top}.py").is_file() or (d / top / "__init__.py").is_file()), None
    )
    if local is None or top in sys.modules:
        return importlib.import_module(module_name)
    sys.path.insert(0, str(local))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(local))  # the first occurrence: the one just inserted


def resolve_import(path: str) -> Any:
    """``package.module:attribute`` -> the object; ValueError with the reason otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:function'")
    try:
        module = _import(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _callable_path(value: str) -> str:
    obj = resolve_import(value)
    if not callable(obj):
        raise ValueError(f"{value!r} is not callable")
    return value


class ModelSection(_Strict):
    factory: str = Field(description="import path of a function returning the nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: str | None = Field(default=None, description="state_dict file, loaded with weights_only=True")

    _check_factory = field_validator("factory")(_callable_path)


class EvaluateSection(_Strict):
    accuracy: str | None = Field(default=None, description="import path of a function returning the validation loader")
    function: str | None = Field(default=None, description="import path of a metric: function(model) -> float")
    threshold: float | None = Field(
        default=None,
        description="with `accuracy`, for a binary model with one score per sample: class 1 above it (0.0 logit, 0.5 probability)",
    )

    @field_validator("accuracy", "function")
    @classmethod
    def _resolve(cls, value: str | None) -> str | None:
        return None if value is None else _callable_path(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> EvaluateSection:
        if (self.accuracy is None) == (self.function is None):
            raise ValueError("set exactly one of `accuracy` (a validation-loader function) or `function` (a metric)")
        if self.threshold is not None and self.accuracy is None:
            raise ValueError("`threshold` goes with `accuracy`; a `function` metric decides its own classes")
        return self


#: ``[finetune] method = ...`` -> the recovery class (tightfit.recovery) it builds.
RECOVERY_METHODS = {
    "finetune": "FineTune",
    "gradual": "GradualPrune",
    "splice": "PruneSplice",
    "lc": "LearningCompression",
    "proxconnect": "ProxConnect",
    "sparse": "SparseTraining",
}


class FinetuneSection(_Strict):
    data: str | None = Field(default=None, description="import path of a function returning the training loader")
    function: str | None = Field(default=None, description="import path of a recovery: function(model) -> None")
    method: Literal["finetune", "gradual", "splice", "lc", "proxconnect", "sparse"] = Field(
        default="finetune", description="which recovery trains each candidate (see docs/recovery.md)"
    )
    # Unset keys keep the method's own defaults (FineTune: 2 epochs, Adam 3e-4; L-C: SGD 0.05; ...).
    epochs: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="further constructor arguments of the method")
    tune: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="recovery hyperparameters the search tunes with the plan: [low, high] or a list of choices",
    )

    @field_validator("tune")
    @classmethod
    def _ranges(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, spec in value.items():
            numeric = len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
            if not numeric and not (spec and all(isinstance(v, str) for v in spec)):
                raise ValueError(f"tune.{name}: give [low, high] numbers or a list of choices (strings), not {spec!r}")
        return value

    @field_validator("data", "function")
    @classmethod
    def _resolve(cls, value: str | None) -> str | None:
        return None if value is None else _callable_path(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> FinetuneSection:
        if (self.data is None) == (self.function is None):
            raise ValueError("set exactly one of `data` (a training-loader function) or `function` (a recovery)")
        return self


class RecoverSection(FinetuneSection):
    """``[recover]``: one recovery after the search (``compress(recover=..., recover_top=top)``): the
    same keys as ``[finetune]`` (the data or function, the method and its settings) and ``top``."""

    top: int = Field(default=1, ge=1, description="the chosen plan and the next best feasible ones, this many in all")

    @field_validator("tune")
    @classmethod
    def _no_tune(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if value:
            raise ValueError(
                "the recovery after the search trains each plan once with fixed settings; remove `tune` "
                "(tune a recovery's settings with the search in [finetune])"
            )
        return value


#: samples a loader gives the calibrated operators when `samples` is not set: what the measurements
#: in docs/calibration.md used (256 training images / sequences)
CALIBRATION_SAMPLES = 256


class CalibrationSection(_Strict):
    """``[calibration]``: the model inputs calibrated operators (GPTQ, AWQ, Wanda, SparseGPT) and the
    one-shot repairs learn from: ``inputs`` (batches of model inputs as they are), ``loader`` (a
    labelled loader, labels stripped), or neither: the training data of ``[finetune]`` / ``[recover]``."""

    inputs: str | None = Field(default=None, description="import path of a function returning batches of model inputs")
    loader: str | None = Field(
        default=None, description="import path of a function returning a loader; its inputs are taken, labels stripped"
    )
    samples: int | None = Field(
        default=None, ge=1, description=f"samples taken from the loader (default {CALIBRATION_SAMPLES})"
    )

    @field_validator("inputs", "loader")
    @classmethod
    def _resolve(cls, value: str | None) -> str | None:
        return None if value is None else _callable_path(value)

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSection:
        if self.inputs is not None and self.loader is not None:
            raise ValueError("set one of `inputs` (batches of model inputs) or `loader` (a labelled loader), not both")
        if self.inputs is not None and self.samples is not None:
            raise ValueError("`samples` goes with a loader; `inputs` are used as they are (return fewer batches)")
        return self


#: the folder of a config's run directory `tightfit compress-once` writes to (`run` writes model.tfz at the top)
ONCE_DIR = "compress-once"


class CompressOnceSection(_Strict):
    """``tightfit compress-once``: the repairs after one-shot compression (``compress_once(repair=)``)."""

    repair: list[Literal["batchnorm", "bias"]] | None = Field(
        default=None, description='default: ["batchnorm"] with calibration data, none without'
    )


class OperatorSection(BaseModel):
    """One operator: ``operator`` names it; the other keys are its constructor arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    operator: str

    @field_validator("operator")
    @classmethod
    def _known(cls, value: str) -> str:
        from ..operators import OPERATOR_REGISTRY

        if value not in OPERATOR_REGISTRY:
            raise ValueError(f"unknown operator {value!r}; known: {sorted(OPERATOR_REGISTRY)}")
        return value

    def arguments(self) -> dict[str, Any]:
        args = dict(self.model_extra or {})
        return {k: tuple(v) if isinstance(v, list) and k != "layers" else v for k, v in args.items()}


#: ``[constraint]`` keys -> tightfit constraints, in the order they are built
CONSTRAINT_FIELDS = ("max_drop", "min_metric", "max_size_bytes", "max_latency_ms", "max_bits", "max_flops")
#: the resource budgets among them (``objective = "metric"`` needs one)
RESOURCE_FIELDS = ("max_size_bytes", "max_bits", "max_flops", "max_latency_ms")


class ConstraintSection(_Strict):
    max_drop: float | None = Field(default=None, ge=0, description="MaxDrop: metric may fall at most this much")
    min_metric: float | None = Field(default=None, description="MinMetric: metric must be at least this")
    max_size_bytes: int | None = Field(default=None, gt=0, description="MaxSize: saved file at most this many bytes")
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="MaxLatency: measured forward time at most this"
    )
    max_bits: float | None = Field(
        default=None, gt=0, description="MaxBits: saved file's bits per weight of the compressible layers"
    )
    max_flops: float | None = Field(
        default=None, gt=0, description="MaxFlops: FLOPs of example_input, nonzero weights only"
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> ConstraintSection:
        if all(getattr(self, name) is None for name in CONSTRAINT_FIELDS):
            raise ValueError(f"set at least one of {', '.join(f'`{n}`' for n in CONSTRAINT_FIELDS)}")
        return self

    def resources(self) -> list[str]:
        """The resource budgets set (what ``objective = "metric"`` maximizes the metric within)."""
        return [name for name in RESOURCE_FIELDS if getattr(self, name) is not None]


class EvaluationSection(_Strict):
    """``[evaluation]``: how candidates are evaluated (maps onto ``tightfit.Sequential``)."""

    method: Literal["full", "sequential"] = Field(
        default="sequential", description="full: every candidate on the whole validation set"
    )
    confidence: float = Field(
        default=0.95, description="probability that all early decisions are right; certificate level"
    )
    first_look: int = Field(default=32, description="validation samples at the first look")
    growth: float = Field(default=2.0, description="each look reads this many times more samples")
    certify_fraction: float = Field(
        default=0.25, description="share of validation samples held out to certify the answer"
    )
    screen: bool = Field(default=True, description="only screen candidates that cannot improve the answer")
    min_improvement: float = Field(
        default=0.01, description="promote a candidate only if its objective is this fraction below the answer's"
    )
    stages: list[float] = Field(
        default=[1 / 6], description="fractions of the fine-tune at which a candidate may be stopped ([] for none)"
    )
    stage_samples: int = Field(default=64, description="validation samples read at each stage")
    min_curves: int = Field(default=3, description="fully fine-tuned candidates needed before any stop")
    max_curves: int = Field(default=5, description="fully fine-tuned candidates whose learning curve is recorded")
    stop_slack: float = Field(default=0.5, description="inflation of the largest gain seen from a stage")
    promote_probability: float = Field(
        default=0.5,
        description="fine-tune on past a stage only while this likely to meet the constraints (0: stop only hopeless ones)",
    )
    probe_samples: int | None = Field(default=64, description="most validation samples a search probe reads")
    futility: float = Field(
        default=0.1, description="reject a candidate at a look once it is less likely than this to meet the constraints"
    )
    futility_samples: int = Field(default=512, description="the smallest look the futility rule applies at")
    trial_samples: int | None = Field(
        default=2048,
        description="most validation samples a trial reads; undecided ones are verified after the search (none: no cap)",
    )
    verify_top: int = Field(default=3, description="capped candidates read to the end after the search, at most")


class LatencySection(_Strict):
    """How latency is measured (tightfit.Latency): on the example input resized to ``batch_size``."""

    batch_size: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    min_run_time: float = Field(default=0.3, gt=0)


class PruneAdjustSection(_Strict):
    """``tightfit prune-adjust``: OLMP's rounds of search (no training) and adjust ([finetune])."""

    rounds: int = Field(default=7, ge=1)
    step: float = Field(
        default=0.4, gt=0, description="metric an untrained round's plan may lose (halved after an undone round)"
    )
    search: str = "olmp"
    search_budget: int = Field(default=30, ge=1)

    @field_validator("search")
    @classmethod
    def _known_search(cls, value: str) -> str:
        return _check_search_name(value)


def _check_search_name(value: str) -> str:
    from ..search.samplers import SAMPLERS

    if value not in SAMPLERS:
        raise ValueError(f"unknown search {value!r}; known: {sorted(SAMPLERS)}")
    return value


class RunConfig(_Strict):
    model: ModelSection
    evaluate: EvaluateSection
    strategy: list[OperatorSection] = Field(min_length=1)
    constraint: ConstraintSection | None = None  # required by `run`, `worker`, `prune-adjust`
    finetune: FinetuneSection | None = None
    recover: RecoverSection | None = None
    calibration: CalibrationSection | None = None
    evaluation: EvaluationSection | None = None
    objective: Literal["size", "nonzeros", "flops", "latency", "metric"] = "size"
    latency: LatencySection | None = None
    budget: int = Field(default=30, ge=1)
    search: str = "auto"
    pick: Literal["posterior", "observed"] = "posterior"
    example_input: str | None = Field(default=None, description="import path of a function returning an example input")
    seed: int = 0
    run_dir: str | None = None
    storage: str | None = None
    study_name: str = "tightfit"
    prune_adjust: PruneAdjustSection | None = None
    compress_once: CompressOnceSection | None = None

    @field_validator("example_input")
    @classmethod
    def _resolve(cls, value: str | None) -> str | None:
        return None if value is None else _callable_path(value)

    @field_validator("search")
    @classmethod
    def _known_search(cls, value: str) -> str:
        return _check_search_name(value)


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid config ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see the config reference in docs/cli.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Parse and validate a config file. Its folder joins ``sys.path`` so modules beside it import."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}).") from None
    base = path.resolve().parent
    _CONFIG_DIRS.append(base)
    if str(base) not in sys.path:
        # appended, not prepended: a file beside the config named like a dependency (matplotlib.py,
        # which tightfit imports for trials.png) must not replace it; the config's own modules are
        # still found there first (resolve_import)
        sys.path.append(str(base))
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    problems = _cross_checks(config)
    if problems:
        lines = [f"{path}: invalid config ({len(problems)} problem(s)):"] + [f"  {p}" for p in problems]
        raise ConfigError("\n".join(lines))
    return config, base


def _cross_checks(config: RunConfig) -> list[str]:
    """What one section cannot check alone: keys that need another section (``field: what to do``)."""
    from ..run.settings import METRIC_SEARCHES

    problems = []
    c = config.constraint
    if config.objective == "metric":
        if c is not None and not c.resources():
            problems.append(
                'objective: "metric" maximizes the metric within a resource budget, but [constraint] sets none, '
                f"so the original would always win; set one of {', '.join('constraint.' + n for n in RESOURCE_FIELDS)} "
                "(e.g. max_bits = 4.5)"
            )
        if config.search not in METRIC_SEARCHES:
            problems.append(
                f'search: objective "metric" searches with one of {list(METRIC_SEARCHES)}, not {config.search!r}'
            )
        if config.evaluation is not None and config.evaluation.method != "full":
            problems.append('evaluation.method: objective "metric" needs every plan measured in full; set "full"')
    if c is not None and c.max_flops is not None and config.example_input is None:
        problems.append("constraint.max_flops: FLOPs are counted on `example_input`; set it (module:function)")
    cal = config.calibration
    if cal is not None and cal.inputs is None and cal.loader is None and _training_data(config) is None:
        problems.append(
            "calibration: give `inputs` (a function returning batches of model inputs) or `loader` (a labelled "
            "loader), or a [finetune] / [recover] `data` loader to take `samples` of the training data from"
        )
    return problems


def _training_data(config: RunConfig) -> tuple[str, str] | None:
    """(field, import path) of the training loader ``[calibration]`` falls back to, if any."""
    for name, section in (("finetune.data", config.finetune), ("recover.data", config.recover)):
        if section is not None and section.data is not None:
            return name, section.data
    return None


def _recovery(section: FinetuneSection, loader: Any, evaluate: Callable, name: str = "finetune") -> Callable:
    """The recovery a ``[finetune]`` (or ``[recover]``, ``name``) section describes (wrapped in
    ``Tuned`` when it has ``tune``)."""
    from .. import recovery

    cls = getattr(recovery, RECOVERY_METHODS[section.method])
    given = {
        "epochs": section.epochs,
        "lr": section.lr,
        "optimizer": section.optimizer,
        "weight_decay": section.weight_decay,
        "max_steps": section.max_steps,
    }
    kwargs: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if "weight_decay" in kwargs and section.method != "finetune":
        raise ConfigError(f"{name}.weight_decay: method {section.method!r} has no weight decay; remove it.")
    if section.method == "lc":
        kwargs["evaluate"] = evaluate  # L-C keeps the best of its epochs by the validation metric
    clashing = sorted(set(section.options) & set(kwargs))
    if clashing:
        raise ConfigError(f"{name}.options: {clashing} are set as [{name}] keys already; give each once.")
    options = dict(section.options)
    if "loss" in options:  # code, named by its import path like every other function of a config
        if not isinstance(options["loss"], str):
            raise ConfigError(
                f"{name}.options.loss: give the import path of a function(model, batch) -> scalar "
                f'tensor, e.g. "my_module:mse_loss", not {options["loss"]!r}.'
            )
        try:
            options["loss"] = resolve_import(_callable_path(options["loss"]))
        except ValueError as exc:
            raise ConfigError(f"{name}.options.loss: {exc}.") from None
    try:
        built = cls(loader, **kwargs, **options)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(
            f"{name}: {exc} (method {section.method!r} builds {cls.__name__}; see its arguments in docs/recovery.md)."
        ) from None
    if not section.tune:
        return built
    ranges = {key: tuple(spec) if not isinstance(spec[0], str) else list(spec) for key, spec in section.tune.items()}
    try:
        return recovery.Tuned(built, **ranges)
    except ConfigError as exc:
        raise ConfigError(f"{name}.tune: {exc}") from None


def _load_weights(model: Any, weights: Path, base: Path) -> None:
    """``model.weights``: a state_dict (``torch.load(weights_only=True)``) loaded into the model."""
    import torch

    weights = weights if weights.is_absolute() else base / weights
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"model.weights: no such file {str(weights)!r}. It is the trained model's state_dict "
            "(torch.save(model.state_dict(), path)); examples/user_project/README.md shows how "
            "to make one."
        ) from None
    except Exception as exc:
        raise ConfigError(f"model.weights: {str(weights)!r} is not a loadable state_dict ({exc}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ConfigError(f"model.weights: does not fit the model from model.factory ({exc}).") from None


def _constraints(section: Any) -> list[Any]:
    """The ``[constraint]`` section as tightfit constraints, in a fixed order."""
    from ..evaluation import MaxBits, MaxDrop, MaxFlops, MaxLatency, MaxSize, MinMetric

    constraints: list[Any] = []
    if section.max_drop is not None:
        constraints.append(MaxDrop(section.max_drop))
    if section.min_metric is not None:
        constraints.append(MinMetric(section.min_metric))
    if section.max_size_bytes is not None:
        constraints.append(MaxSize(section.max_size_bytes))
    if section.max_latency_ms is not None:
        constraints.append(MaxLatency(section.max_latency_ms))
    if section.max_bits is not None:
        constraints.append(MaxBits(section.max_bits))
    if section.max_flops is not None:
        constraints.append(MaxFlops(section.max_flops))
    return constraints


def _call(field: str, import_path: str, *args: Any, **kwargs: Any) -> Any:
    """Call the function at ``import_path``; its failure is a ConfigError naming ``field``."""
    try:
        return resolve_import(import_path)(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{field}: calling {import_path!r} failed ({type(exc).__name__}: {exc}).") from exc


def _model(config: RunConfig, base: Path) -> Any:
    """The model ``model.factory`` builds, with ``model.weights`` loaded when given."""
    import torch

    model = _call("model.factory", config.model.factory, **config.model.kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.factory: {config.model.factory!r} returned a {type(model).__name__}, not an nn.Module."
        )
    if config.model.weights is not None:
        _load_weights(model, Path(config.model.weights), base)
    return model


def _evaluate(config: RunConfig) -> Callable:
    from ..evaluation import Accuracy

    if config.evaluate.accuracy is not None:
        return Accuracy(_call("evaluate.accuracy", config.evaluate.accuracy), threshold=config.evaluate.threshold)
    assert config.evaluate.function is not None  # EvaluateSection's validator requires one of the two
    return resolve_import(config.evaluate.function)


def _operators(config: RunConfig) -> list[Any]:
    """One operator per ``[[strategy]]`` entry; a bad argument names the entry's index and operator."""
    from ..operators import OPERATOR_REGISTRY

    operators = []
    for index, section in enumerate(config.strategy):
        arguments = section.arguments()
        try:
            operators.append(OPERATOR_REGISTRY[section.operator](**arguments))
        except ConfigError as exc:
            # "Quantize: `group_size` must be ..." -> strategy[1].group_size: the key to change
            named = re.search(r"`(\w+)", str(exc))
            key = f".{named.group(1)}" if named and named.group(1) in arguments else ""
            hint = " (TOML has no None: write 0 for one scale per channel)" if key == ".group_size" else ""
            raise ConfigError(f"strategy[{index}]{key} ({section.operator}): {exc}{hint}") from None
        except TypeError as exc:
            raise ConfigError(f"strategy[{index}] ({section.operator}): {exc}.") from None
    return operators


def _finetune(config: RunConfig, evaluate: Callable) -> Callable | None:
    if config.finetune is None:
        return None
    ft = config.finetune
    if ft.function is not None:
        return resolve_import(ft.function)
    assert ft.data is not None  # FinetuneSection's validator requires `data` or `function`
    return _recovery(ft, _call("finetune.data", ft.data), evaluate)


def _recover(config: RunConfig, evaluate: Callable) -> Callable | None:
    """``[recover]``: the recovery after the search (``compress(recover=...)``)."""
    section = config.recover
    if section is None:
        return None
    if section.function is not None:
        return resolve_import(section.function)
    assert section.data is not None  # the section's validator requires `data` or `function`
    return _recovery(section, _call("recover.data", section.data), evaluate, name="recover")


def calibration_users(operators: list[Any]) -> list[Any]:
    """The operators that learn from calibration data (GPTQ, AWQ, Wanda, SparseGPT)."""
    return [op for op in operators if op.needs_calibration()]


def _calibration(config: RunConfig) -> list[Any] | None:
    """``[calibration]`` read once into a list of batches of model inputs (None without the section).
    A loader is read with the run's seed, so a shuffled training loader gives the same samples to a
    resumed run and to every worker (their digest is compared with the study's)."""
    import torch

    from ..evaluation import loader_inputs

    section = config.calibration
    if section is None:
        return None
    if section.inputs is not None:
        field, batches = "calibration.inputs", _call("calibration.inputs", section.inputs)
        if isinstance(batches, (torch.Tensor, dict)) or not hasattr(batches, "__iter__"):
            raise ConfigError(
                f"calibration.inputs: {section.inputs!r} returned a {type(batches).__name__}, not an iterable of "
                "batches of model inputs; return a list ([batch] for one batch)."
            )
        batches = list(batches)
    else:
        given = ("calibration.loader", section.loader) if section.loader is not None else _training_data(config)
        assert given is not None  # _cross_checks requires a source
        field, path = given
        loader = _call(field, path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            try:
                batches = loader_inputs(loader, max_samples=section.samples or CALIBRATION_SAMPLES)
            except ConfigError as exc:
                raise ConfigError(f"{field}: {exc}") from None
    if not batches:
        raise ConfigError(f"{field}: gave no batch; calibration needs a few hundred samples of model inputs.")
    return batches


def _check_calibration(config: RunConfig, operators: list[Any], used_by: str) -> None:
    """Calibrated operators need ``[calibration]``; a ``[calibration]`` nothing uses is refused (``used_by``:
    what else would use it in this command, or empty)."""
    users = calibration_users(operators)
    if users and config.calibration is None:
        raise ConfigError(
            f"calibration: {', '.join(repr(op) for op in users)} learn(s) from calibration data; add a [calibration] "
            'section (e.g. `samples = 256` of the [finetune] training data, or `loader = "my_models:train_loader"`), '
            'or use method = "rtn" / "magnitude". The validation data is not used: it judges the plans.'
        )
    if config.calibration is not None and not users and not used_by:
        raise ConfigError(
            'calibration: no [[strategy]] operator learns from calibration data (Quantize with method = "gptq" or '
            'awq = true, Prune with method = "wanda" / "sparsegpt"); remove [calibration] or set such a method.'
        )


def _latency(config: RunConfig, example_input: Any) -> Any:
    from ..measure import Latency

    if config.latency is None:
        return None
    if example_input is None:
        raise ConfigError(
            "latency: measuring latency needs `example_input` (an import path of a function returning one)."
        )
    return Latency(
        example_input,
        batch_size=config.latency.batch_size,
        threads=config.latency.threads,
        min_run_time=config.latency.min_run_time,
    )


def _run_dir(config: RunConfig, base: Path, config_path: Path) -> Path:
    """``run_dir`` (default runs/<config name>), relative to the config's folder."""
    run_dir_path = Path(config.run_dir or f"runs/{config_path.stem}")
    if not run_dir_path.is_absolute():
        run_dir_path = base / run_dir_path
    return run_dir_path


def build_arguments(config: RunConfig, base: Path, config_path: Path) -> dict[str, Any]:
    """Everything :func:`tightfit.compress` needs, built from a validated config."""
    from ..operators import Compose

    if config.constraint is None:
        raise ConfigError(
            "constraint: required field is missing: a search needs a [constraint] section (e.g. max_drop = 0.01); "
            "only `tightfit compress-once` goes without."
        )
    # built in this order so that the first bad section is the one reported
    model = _model(config, base)
    evaluate = _evaluate(config)
    operators = _operators(config)
    _check_calibration(config, operators, used_by="")
    constraints = _constraints(config.constraint)
    finetune = _finetune(config, evaluate)
    recover = _recover(config, evaluate)
    calibration = _calibration(config)
    example_input = _call("example_input", config.example_input) if config.example_input else None
    latency = _latency(config, example_input)
    return dict(
        model=model,
        evaluate=evaluate,
        strategy=Compose(operators),
        constraint=constraints,
        objective=config.objective,
        finetune=finetune,
        budget=config.budget,
        search=config.search,
        pick=config.pick,
        example_input=example_input,
        latency=latency,
        seed=config.seed,
        run_dir=str(_run_dir(config, base, config_path)),
        storage=config.storage,
        study_name=config.study_name,
        artifact_extra={"factory": config.model.factory, "factory_kwargs": config.model.kwargs},
        evaluation=_evaluation(config.evaluation),
        calibration=calibration,
        recover=recover,
        recover_top=config.recover.top if config.recover is not None else 1,
    )


def check_run(arguments: dict[str, Any]) -> None:
    """``tightfit.compress``'s own checks of the built arguments (the pairs a config cannot see, e.g.
    a calibrated operator's needs), run before the run directory or the study is touched."""
    from ..run.settings import Settings, check

    check(arguments["model"], Settings.of(**{k: v for k, v in arguments.items() if k != "model"}))


def prune_adjust_arguments(config: RunConfig, base: Path, config_path: Path) -> dict[str, Any]:
    """Everything :func:`tightfit.prune_and_adjust` needs, built from a validated config: the
    model, data and strategy as for ``run``, ``[finetune]`` as the adjust, ``constraint.max_drop``."""
    section = config.prune_adjust or PruneAdjustSection()
    if config.finetune is None:
        raise ConfigError(
            "prune_adjust: needs a [finetune] section, the recovery that trains each round's plan "
            '(e.g. method = "gradual", epochs = 30).'
        )
    others = [k for k in CONSTRAINT_FIELDS if k != "max_drop" and getattr(config.constraint, k, None) is not None]
    if config.constraint is None or config.constraint.max_drop is None or others:
        raise ConfigError(
            "constraint: prune-adjust takes only `max_drop` (how far below the original the answer may "
            f"fall){'; remove ' + ', '.join(others) if others else ''}."
        )
    for unused in ("recover", "calibration"):
        if getattr(config, unused) is not None:
            raise ConfigError(
                f"{unused}: prune-adjust trains every round with [finetune] and prunes by magnitude; "
                f"remove [{unused}] (it is for `tightfit run` and `tightfit compress-once`)."
            )
    arguments = build_arguments(config, base, config_path)
    return dict(
        model=arguments["model"],
        evaluate=arguments["evaluate"],
        adjust=arguments["finetune"],
        max_drop=config.constraint.max_drop,
        rounds=section.rounds,
        step=section.step,
        strategy=arguments["strategy"],
        search=section.search,
        search_budget=section.search_budget,
        example_input=arguments["example_input"],
        seed=config.seed,
        # a folder of its own: `tightfit run` on the same config writes model.tfz at the top
        run_dir=str(Path(arguments["run_dir"]) / "prune-adjust"),
    )


def once_arguments(config: RunConfig, base: Path, config_path: Path) -> dict[str, Any]:
    """Everything one-shot compression needs, built (and checked) from a validated config."""
    from ..operators import Compose

    c = config.constraint
    if c is not None and c.max_latency_ms is not None:
        raise ConfigError(
            "constraint.max_latency_ms: compress-once does not time the model; remove it and time the result "
            "with `tightfit export RUN_DIR/compress-once --config CONFIG`."
        )
    repair = config.compress_once.repair if config.compress_once is not None else None
    model = _model(config, base)
    evaluate = _evaluate(config)
    operators = _operators(config)
    _check_calibration(config, operators, used_by="the repairs" if repair is None or repair else "")
    if repair and config.calibration is None:
        raise ConfigError(
            f"compress_once.repair: {repair} learn(s) from calibration data; add a [calibration] section or "
            "set repair = []."
        )
    example_input = _call("example_input", config.example_input) if config.example_input else None
    if c is not None and c.max_flops is not None and example_input is None:
        raise ConfigError("constraint.max_flops: FLOPs are counted on `example_input`; set it (module:function).")
    return dict(
        model=model,
        evaluate=evaluate,
        strategy=Compose(operators),
        calibration=_calibration(config),
        example_input=example_input,
        repair=repair,
        constraints=_constraints(c) if c is not None else [],
        run_dir=_run_dir(config, base, config_path) / ONCE_DIR,
    )


def _evaluation(section: EvaluationSection | None) -> Sequential | None:
    if section is None or section.method == "full":
        return None
    from ..evaluation.sequential import Sequential

    try:
        return Sequential(
            confidence=section.confidence,
            first_look=section.first_look,
            growth=section.growth,
            certify_fraction=section.certify_fraction,
            screen=section.screen,
            min_improvement=section.min_improvement,
            stages=tuple(section.stages),
            stage_samples=section.stage_samples,
            min_curves=section.min_curves,
            max_curves=section.max_curves,
            stop_slack=section.stop_slack,
            promote_probability=section.promote_probability,
            probe_samples=section.probe_samples,
            futility=section.futility,
            futility_samples=section.futility_samples,
            trial_samples=section.trial_samples,
            verify_top=section.verify_top,
        )
    except ConfigError as exc:
        raise ConfigError(f"[evaluation]: {exc}") from None
