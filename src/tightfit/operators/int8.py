"""Runtime int8 for Linear and LSTM layers: the search chooses, per layer, int8 or float.

A matrix layer (``MATRIX_KIND``, e.g. GPT-2's ``Conv1D``) that computes ``x @ W + b`` is run in
int8 too: the plan swaps it for its Linear equivalent first (:mod:`.matrix`, as LowRank does), so
it is stored, reloaded and exported exactly like a Linear. A matrix layer used otherwise, or whose
parent reads its weight directly, is left alone and named (:meth:`Int8.refused`). An ``nn.LSTM``
runs as ONNX Runtime's ``DynamicQuantizeLSTM`` (its input and recurrent matrices in int8, one scale
per gate row); GRU and RNN layers have no such kernel and are left alone.

In the search the layer's weight is put on the int8 grid the export quantizes to (symmetric, per
output channel, ONNX Runtime's reduced range: codes in [-64, 64]), so the metric sees the weight
error, the ``.tfz`` stores 8-bit codes and the export re-quantizes them exactly. The reduced range
is what keeps the int8 file's answer the same on CPUs without AVX-512 VNNI (see
``tightfit.export.verified.PORTABLE_INT8``). The speed exists only in a runtime with int8 kernels:
``Latency(..., runtime="onnxruntime")`` times the trial as the int8 ONNX model it exports to,
and ``tightfit export RUN_DIR --format onnx`` writes exactly those layers in int8. Activations are
quantized per call at run time; that error is not in the search's metric, and the export's
output check bounds it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..measure.analysis import MATRIX_KIND, RECURRENT_KINDS, LayerInfo, layer_kind, weight_names
from .base import Hyperparameter, Operator
from .matrix import NOT_AFFINE, linear_equivalent, unswappable
from .quantize import FakeQuantize
from .recurrent import parametrize_weights

#: Why a matrix layer is left alone when no example input lets tightfit check the swap.
NO_EXAMPLE_INPUT = "running it as an nn.Linear is checked on the model's example input: pass `example_input`"

#: Why a GRU / RNN is left alone by Int8 (Prune and Quantize take it).
NO_RECURRENT_KERNEL = (
    "int8 runs a recurrent layer through ONNX Runtime's DynamicQuantizeLSTM, which exists for LSTM "
    "only (no int8 GRU / RNN kernel)"
)

#: Why an LSTM with ``proj_size`` is left alone by Int8.
LSTM_PROJECTION = "an LSTM with proj_size has no ONNX LSTM operator to run in int8 (ONNX's LSTM has no projection)"


class Int8Weights(FakeQuantize):
    """Symmetric per-channel int8 weight grid with ONNX Runtime's reduced range (codes in [-64, 64],
    stored in 8 bits), marked as "run this layer in int8"."""

    def __init__(self) -> None:
        super().__init__(8)

    @property
    def qmax(self) -> int:
        # ONNX Runtime's reduce_range int8 range (-64, 64): |code| <= 64 cannot saturate the int16
        # pair sums of its uint8 x int8 kernel on CPUs without VNNI (255 * 64 * 2 = 32640 <= 32767)
        return 64


class Int8(Operator):
    """Run Linear layers (and matrix layers that compute ``x @ W + b``) and LSTMs in int8 (dynamic
    quantization) where the search finds it pays.

    ``choices`` are what each layer may be: ``(True, False)`` lets the search keep a layer in
    float; ``(True,)`` makes every matched layer int8.
    """

    name = "int8"

    def __init__(self, choices: tuple[bool, ...] = (True, False), *, layers: list[str] | None = None) -> None:
        super().__init__(layers=layers)
        values = (choices,) if isinstance(choices, bool) else tuple(bool(c) for c in choices)
        if not values:
            raise ConfigError("Int8: `choices` must hold True and/or False.")
        self.choices = tuple(sorted(set(values), reverse=True))
        self._matrix: set[str] = set()  # matrix layers that run as their Linear equivalent
        self._refused: dict[str, str] = {}

    def prepare(self, model: nn.Module, example_input: Any) -> None:
        # Matrix layers join when they compute x @ W + b and swapping in that Linear leaves the
        # model's output as it was (a parent may read the weight directly, in its stored layout).
        self._refused = {}
        equivalents = {}
        for name, module in model.named_modules():
            if name and layer_kind(module) == MATRIX_KIND:
                linear = linear_equivalent(module)
                if linear is None:
                    self._refused[name] = NOT_AFFINE
                else:
                    equivalents[name] = linear
        if example_input is None:
            self._refused.update(dict.fromkeys(equivalents, NO_EXAMPLE_INPUT))
        else:
            self._refused.update(unswappable(model, example_input, equivalents, same_output=True))
        self._matrix = set(equivalents) - set(self._refused)
        for name, module in model.named_modules():
            if layer_kind(module) == "LSTM" and module.proj_size:
                self._refused[name] = LSTM_PROJECTION

    def refused(self) -> dict[str, str]:
        return dict(self._refused)

    def supports(self, layer: LayerInfo) -> bool:
        # an nn.Linear itself (a subclass may be read by its parent: attention's out_proj), a checked
        # matrix layer, or an LSTM (ONNX Runtime's DynamicQuantizeLSTM)
        return (
            (layer.type == layer.kind == "Linear")
            or (layer.kind == MATRIX_KIND and layer.name in self._matrix)
            or (layer.kind == "LSTM" and layer.name not in self._refused)
        )

    def why_not_tied(self, tied: list[str]) -> str:
        return (
            f"int8 runs the layer as a quantized Linear holding its own int8 weight, which would untie it from "
            f"{', '.join(tied)} (tied weights); prune / quantize compress the shared weight instead"
        )

    def why_not(self, layer: LayerInfo) -> str | None:
        return NO_RECURRENT_KERNEL if layer.kind in RECURRENT_KINDS else None

    def needs_linear(self, settings: dict[str, Any]) -> bool:
        return bool(settings["int8"])

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        return [Hyperparameter("int8", choices=self.choices)]

    def identity(self) -> dict[str, Any]:
        return {"int8": False}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        if settings["int8"] and layer_kind(module) == "LSTM":
            parametrize_weights(module, lambda weight: Int8Weights())  # ONNX Runtime's grid: one scale per gate row
        elif settings["int8"]:
            if not isinstance(module, nn.Linear):  # the per-channel grid and the ONNX kernels are a Linear's
                raise ConfigError(
                    f"Int8 runs nn.Linear layers, not {type(module).__name__}; apply a plan with tightfit.apply, "
                    "which swaps a matrix layer for its nn.Linear first."
                )
            parametrize.register_parametrization(module, "weight", Int8Weights())

    def config(self) -> dict[str, Any]:
        return {"choices": list(self.choices), **super().config()}


def int8_layers(model: nn.Module) -> list[str]:
    """Names of the layers an :class:`Int8` plan marked for int8 (before baking)."""
    names = []
    for name, module in model.named_modules():
        tensor = weight_names(module)[0]
        if parametrize.is_parametrized(module, tensor):
            steps = list(module.parametrizations[tensor])
            if steps and isinstance(steps[-1], Int8Weights):
                names.append(name)
    return names


def plan_int8_layers(plan: Any) -> list[str]:
    """Layers a plan (Plan or its dict) puts in int8."""
    layers = plan.layers if hasattr(plan, "layers") else (plan or {}).get("layers", {})
    return sorted(name for name, per_op in layers.items() if per_op.get("int8", {}).get("int8"))
