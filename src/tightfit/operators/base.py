"""The operator contract: what an operator searches, and how it compresses one layer.

An operator compresses a layer *reversibly*: it registers a parametrization on the layer's weight
(``torch.nn.utils.parametrize``), so the original weight stays trainable underneath, fine-tuning
keeps masks and quantization grids consistent, and baking happens only when the model is saved.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import LayerInfo


@dataclass(frozen=True)
class Hyperparameter:
    """One searchable knob of one operator on one layer.

    Exactly one of (``low``, ``high``) or ``choices`` is set. ``integer`` asks for whole numbers
    in [low, high]; ``log`` searches on a log scale.
    """

    name: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False
    log: bool = False

    def __post_init__(self) -> None:
        if self.choices is None:
            if self.low is None or self.high is None:
                raise ConfigError(f"Hyperparameter {self.name!r} needs `choices` or both `low` and `high`.")
            if not self.low <= self.high:
                raise ConfigError(
                    f"Hyperparameter {self.name!r}: `low <= high` must hold, but got (low={self.low}, high={self.high})."
                )
        elif len(self.choices) == 0:
            raise ConfigError(f"Hyperparameter {self.name!r}: `choices` must not be empty.")

    @property
    def fixed(self) -> bool:
        """True when there is nothing to search (one choice, or low == high)."""
        if self.choices is not None:
            return len(self.choices) == 1
        return self.low == self.high

    @property
    def fixed_value(self) -> Any:
        return self.choices[0] if self.choices is not None else self.low


#: What a calibrated layer's weights are fit to (``Quantize`` / ``Prune`` ``target=``): ``"layer"``
#: (GPTQ's and SparseGPT's) its own outputs on the inputs the compressed layers before it give it;
#: ``"original"`` the original model's outputs at that layer on the original model's inputs, so
#: that the errors of the layers before it are compensated too
#: (:func:`tightfit.operators.solvers.original_target`).
TARGETS = ("layer", "original")


def check_target(owner: str, target: Any, calibrated: bool, calibrated_how: str) -> str:
    """``target`` validated (see :data:`TARGETS`); ``"original"`` needs a calibrated method."""
    if target not in TARGETS:
        raise ConfigError(f"{owner}: `target` must be one of {TARGETS}, but got {target!r}.")
    if target == "original" and not calibrated:
        raise ConfigError(
            f"{owner}: target='original' fits the weights to the original model's outputs on calibration "
            f"data; it needs {calibrated_how}."
        )
    return str(target)


def parse_range(owner: str, name: str, value: Any, inside: Callable[[float], bool], bounds: str) -> tuple[float, float]:
    """A searchable setting given as one number (fixed) or a ``(low, high)`` pair, checked once:
    each end must satisfy ``inside`` (described by ``bounds``, e.g. "[0, 1)") and low <= high."""
    if isinstance(value, (int, float)):
        low = high = float(value)
    else:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{owner}: `{name}` must be a number or a (low, high) pair, but got {value!r}.") from None
    for end in (low, high):
        if not inside(end):
            raise ConfigError(f"{owner}: `{name}` must lie in {bounds}, but got {end!r}.")
    if low > high:
        raise ConfigError(f"{owner}: `{name}` range needs low <= high, but got ({low}, {high}).")
    return low, high


class Operator(abc.ABC):
    """A compression operator. Subclasses set ``name`` and implement the three methods below."""

    name: ClassVar[str]

    #: Whether the operator changes a layer's shape or type (structured pruning, low-rank). Such
    #: operators run before the weight-level ones, and the artifact stores the changed architecture.
    structural: ClassVar[bool] = False

    #: Whether the operator compresses a weight several modules share (tied weights: an output head
    #: and its input embedding). Such an operator compresses the tensor on the group's leader by
    #: parametrizations, which tightfit registers on every other module of the group too (see
    #: :func:`~tightfit.measure.analysis.tied_groups`). Operators that change shapes or swap modules
    #: would untie the group, so they leave it alone (:meth:`why_not_tied` says why).
    compresses_tied: ClassVar[bool] = False

    def __init__(self, *, layers: list[str] | None = None) -> None:
        #: fnmatch patterns of layer names this operator may touch; None means every layer it supports.
        self.layers = list(layers) if layers is not None else None

    @abc.abstractmethod
    def supports(self, layer: LayerInfo) -> bool:
        """Whether this operator can compress the layer at all."""

    @abc.abstractmethod
    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        """The knobs searched for this layer (fixed ones included; the space skips them)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """The setting that leaves the layer's output unchanged."""

    @abc.abstractmethod
    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        """Compress ``module`` in place with ``settings`` (reversibly, by parametrization)."""

    def prepare(self, model: nn.Module, example_input: Any) -> None:
        """Learn what this operator needs of the whole model before the search space is built.

        Most operators look at one layer at a time and need nothing; model-level operators
        (structured pruning finds coupled channel groups) override this.
        """
        return None  # deliberately a no-op hook, not abstract: most operators need nothing here

    def needs_linear(self, settings: dict[str, Any]) -> bool:
        """Whether a layer with ``settings`` must run as an ``nn.Linear`` (int8 kernels do). A matrix
        layer (``MATRIX_KIND``, e.g. GPT-2's ``Conv1D``) given such settings is swapped for its Linear
        equivalent before any operator of the plan applies, and again when a saved model is loaded
        into a fresh instance (see :func:`~tightfit.operators.apply_plan_inplace`)."""
        return False

    def needs_calibration(self) -> bool:
        """Whether this operator compresses from calibration data (GPTQ, Wanda, SparseGPT): it then
        implements ``apply_calibrated(module, settings, view, stats)`` and ``apply_uncalibrated``
        (its data-free method, for layers it cannot read), and :meth:`apply` refuses."""
        return False

    def refused(self) -> dict[str, str]:
        """Layers this operator could have compressed but leaves alone after :meth:`prepare`, with
        the reason (shown in the run's list of what was left alone)."""
        return {}

    def touches(self) -> list[str]:
        """Modules, after :meth:`prepare`, that this operator may change without a plan entry of their
        own (structured pruning: an ``nn.MultiheadAttention`` whose heads it removes, its entry on
        ``out_proj``); the run does not list them as left alone."""
        return []

    def why_not(self, layer: LayerInfo) -> str | None:
        """Why this operator does not take ``layer`` (one it does not :meth:`supports` and did not
        refuse), for the run's list of what was left alone; None: the layer's type says it."""
        return None

    def why_not_tied(self, tied: list[str]) -> str:
        """Why this operator leaves alone a layer whose weight the modules ``tied`` share with it."""
        return (
            f"{self.name} does not compress a weight shared with {', '.join(tied)} (tied weights); "
            "prune / quantize compress it once for every module that shares it"
        )

    def follows(self) -> dict[str, list[str]]:
        """Modules, after :meth:`prepare`, that this operator compresses through other layers' plan
        entries, mapped to those layers (structured pruning: a layer whose input channels, or a
        BatchNorm whose channels, go with the group another layer leads). The run does not list them
        as left alone while one of those layers is in the search space."""
        return {}

    def apply_to_model(self, model: nn.Module, settings_by_layer: dict[str, dict[str, Any]]) -> None:
        """Compress ``model`` in place: ``settings_by_layer`` maps layer names to validated settings.

        The default applies :meth:`apply` layer by layer. A layer that an earlier structural
        operator replaced by a container (low-rank: one Linear -> two) gets the operator on each
        compressible layer inside it. Model-level operators override this.
        """
        from ..measure.analysis import layer_kind

        for layer_name, settings in settings_by_layer.items():
            module = model.get_submodule(layer_name) if layer_name else model
            if layer_kind(module) is not None or self.structural:
                self.apply(module, settings)
                continue
            inner = [m for m in module.modules() if layer_kind(m) is not None]
            if not inner:
                raise ConfigError(f"{self.name!r} cannot compress layer {layer_name!r} ({type(module).__name__}).")
            for sub in inner:
                self.apply(sub, settings)

    def project(self, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        """The weight nearest to ``weight`` that ``settings`` allows (for learning-compression's
        C-step). Operators that cannot project leave this unimplemented; see :class:`Projection`."""
        raise NotImplementedError(f"Operator {self.name!r} has no projection, so learning-compression cannot use it.")

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready, so that a plan records how it was made."""
        return {"layers": self.layers}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Operator:
        """The operator a plan's recorded :meth:`config` stands for (an operator whose defaults
        changed fills in what plans written before meant)."""
        return cls(**config)

    def validate_settings(self, layer_name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Check settings from a plan against this operator; returns them completed with defaults."""
        merged = {**self.identity(), **settings}
        unknown = set(settings) - set(self.identity())
        if unknown:
            raise ConfigError(
                f"Plan entry {layer_name!r} -> {self.name!r} has unknown setting(s) {sorted(unknown)}; "
                f"{self.name!r} accepts {sorted(self.identity())}."
            )
        return merged

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if v is not None)
        return f"{type(self).__name__}({args})"


class Projection(abc.ABC):
    """Mixin for a parametrization that can *project*: map any weight onto the compressed set it
    stands for (same sparsity, same grid, same rank...) and re-fit itself to that point.

    Recovery methods that train the uncompressed weight underneath (learning-compression) use it:
    ``theta = step.project(w)`` returns the compressed weight and leaves the step such that
    ``step(theta) == theta``. A new operator (e.g. low-rank) joins by giving its parametrization
    this method; operators whose parametrizations lack it are trained as plain fine-tuning does.
    """

    @abc.abstractmethod
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest allowed weight (no gradient); the step is re-fitted so it reproduces it."""
