"""Runtime int8 for Linear layers: the search chooses, per layer, int8 or float.

In the search the layer's weight is put on the int8 grid ONNX Runtime's dynamic quantization
uses (symmetric, per output channel, codes in [-127, 127]), so the metric sees the weight error
and the ``.tfz`` stores 8-bit codes. The speed exists only in a runtime with int8 kernels:
``Latency(..., runtime="onnxruntime")`` times the trial as the int8 ONNX model it exports to,
and ``tightfit export RUN_DIR --format onnx`` writes exactly those layers in int8. Activations are
quantized per call at run time; that error is not in the search's metric, and the export's
output check bounds it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..measure.analysis import LayerInfo
from .base import Hyperparameter, Operator
from .quantize import FakeQuantize


class Int8Weights(FakeQuantize):
    """8-bit symmetric per-channel weight grid, marked as "run this layer in int8"."""

    def __init__(self) -> None:
        super().__init__(8)


class Int8(Operator):
    """Run Linear layers in int8 (dynamic quantization) where the search finds it pays.

    ``choices`` are what each layer may be: ``(True, False)`` lets the search keep a layer in
    float; ``(True,)`` makes every matched layer int8.
    """

    name = "int8"

    def __init__(self, choices: tuple[bool, ...] = (True, False), *, layers: list[str] | None = None) -> None:
        super().__init__(layers=layers)
        values = (choices,) if isinstance(choices, bool) else tuple(bool(c) for c in choices)
        if not values:
            from ..errors import ConfigError

            raise ConfigError("Int8: `choices` must hold True and/or False.")
        self.choices = tuple(sorted(set(values), reverse=True))

    def supports(self, layer: LayerInfo) -> bool:
        return layer.type == "Linear"

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        return [Hyperparameter("int8", choices=self.choices)]

    def identity(self) -> dict[str, Any]:
        return {"int8": False}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        if settings["int8"]:
            parametrize.register_parametrization(module, "weight", Int8Weights())

    def config(self) -> dict[str, Any]:
        return {"choices": list(self.choices), **super().config()}


def int8_layers(model: nn.Module) -> list[str]:
    """Names of the layers an :class:`Int8` plan marked for int8 (before baking)."""
    names = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            steps = list(module.parametrizations["weight"])
            if steps and isinstance(steps[-1], Int8Weights):
                names.append(name)
    return names


def plan_int8_layers(plan: Any) -> list[str]:
    """Layers a plan (Plan or its dict) puts in int8."""
    layers = plan.layers if hasattr(plan, "layers") else (plan or {}).get("layers", {})
    return sorted(name for name, per_op in layers.items() if per_op.get("int8", {}).get("int8"))
