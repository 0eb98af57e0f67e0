"""Verified export: write a model as ONNX / TorchScript / a pickled module, load it back the way a
user would (onnxruntime for ONNX), check its outputs against the PyTorch model, and time it.

A failed check raises :class:`ExportCheckError`; it is never a warning. The check is
``max|exported - reference| <= atol + rtol * max|reference|`` over every output element, on the
example input (at the batch size the latency is measured at, when that differs).

``int8="dynamic"`` (weights int8, activations quantized on the fly: Linear/MatMul/LSTM) and
``int8="static"`` (activations too, scales from a calibration set: convolutions) run through
ONNX Runtime's quantization tools; the file written is the int8 model, so its size is what ships.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..measure.analysis import call_model, model_arguments, output_tensors, split_arguments
from ..measure.latency import Latency, with_batch_size
from .artifact import bake

FORMATS = ("onnx", "torchscript", "pt")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "pt": ".pt"}
INT8_MODES = ("dynamic", "static")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class CastWrapper(nn.Module):
    """Runs the wrapped model in a 16-bit float type behind a float32 interface: floating inputs
    are cast down on the way in, floating outputs back to float32 on the way out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self._cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v, dtype) for k, v in value.items()}
        return value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*self._cast(args, self.dtype), **self._cast(kwargs, self.dtype))
        return self._cast(out, torch.float32)


class ExportCheckError(ArtifactError):
    """The exported model's outputs differ from the PyTorch model's beyond the stated tolerance."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how it compares. Sizes in bytes of the written file; latencies in ms
    per forward pass of ``latency_batch_size`` samples with ``threads`` threads."""

    path: str
    format: str
    size_bytes: int
    max_abs_diff: float
    reference_max_abs: float
    atol: float
    rtol: float
    int8: str | None = None
    dtype: str | None = None
    float_layers: list[str] = field(default_factory=list)
    int8_layers: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    reference_latency_ms: float | None = None
    latency_batch_size: int | None = None
    threads: int | None = None

    @property
    def speedup_vs_pytorch(self) -> float | None:
        if self.latency_ms and self.reference_latency_ms:
            return self.reference_latency_ms / self.latency_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_vs_pytorch": self.speedup_vs_pytorch}


# -- inputs and outputs as flat lists of tensors ------------------------------------------------------


def _flat_inputs(example_input: Any) -> list[torch.Tensor]:
    """The input's tensors in the order the exported model takes them (:func:`_argument_tensors`)."""
    return _argument_tensors(*split_arguments(example_input))


def _plain_outputs(output: Any) -> bool:
    """Whether an output is what the ONNX and TorchScript tracers take as it is: a tensor, or a
    tuple/list of tensors."""
    return isinstance(output, torch.Tensor) or (
        isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output))


def _argument_tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors of a call's arguments, in order: positional ones (a dict argument's values in
    its order), then keyword ones."""
    values = [v for a in args for v in (a.values() if isinstance(a, Mapping) else (a,))] + list(kwargs.values())
    return [v for v in values if isinstance(v, torch.Tensor)]


def _refill(args: tuple, kwargs: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
    """``args``/``kwargs`` with their tensors (:func:`_argument_tensors`) replaced by ``tensors``."""
    given = iter(tensors)

    def fill(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(given)
        if isinstance(value, Mapping):
            return {k: next(given) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        return value

    return tuple(fill(a) for a in args), {k: fill(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def tensor_interface(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """``model`` as a module the tracers take, and the positional and keyword inputs to trace it
    with; ``args``/``kwargs`` are how the model is called (:func:`~tightfit.measure.analysis.model_arguments`).

    A model that returns a dict, a Hugging Face ``ModelOutput`` or a cache object among its tensors
    (Llama's ``DynamicCache``, T5's ``EncoderDecoderCache``) cannot be traced as it is, and
    TorchScript takes keyword inputs only by the forward's own parameter names. Such a model is
    traced as a shallow copy (same submodules, so ONNX node names, which ``keep_float`` matches,
    stay the same) whose forward takes the call's tensors positionally (the order of
    :func:`_flat_inputs`; its other values are kept as constants) and returns
    :func:`output_tensors` of the output, the tensors the check compares. A model with plain
    outputs is returned unchanged with its own arguments."""
    import types

    with torch.no_grad():
        if _plain_outputs(model(*args, **kwargs)):
            return model, args, kwargs
    own_forward = model.forward  # the model's own (possibly an instance attribute); the copy shares its modules

    def forward(self: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call_args, call_kwargs = _refill(args, kwargs, tensors)
        return tuple(output_tensors(own_forward(*call_args, **call_kwargs)))

    traced = copy.copy(model)
    traced.forward = types.MethodType(forward, traced)
    return traced, tuple(_argument_tensors(args, kwargs)), {}


def compare_outputs(reference: Sequence[torch.Tensor], exported: Sequence[Any], atol: float, rtol: float) -> tuple[float, float]:
    """(max abs difference, max abs reference); raises ExportCheckError beyond the tolerance."""
    if len(reference) != len(exported):
        raise ExportCheckError(f"The exported model returns {len(exported)} output(s); the PyTorch model returns {len(reference)}.")
    worst = ref_max = 0.0
    for i, (ref, got) in enumerate(zip(reference, exported)):
        got = torch.as_tensor(got)
        if tuple(ref.shape) != tuple(got.shape):
            raise ExportCheckError(f"Output {i}: shape {tuple(got.shape)} exported vs {tuple(ref.shape)} in PyTorch.")
        ref_f, got_f = ref.detach().double(), got.detach().double()
        diff = (ref_f - got_f).abs().nan_to_num(nan=float("inf")).max() if ref.numel() else torch.tensor(0.0)
        worst = max(worst, float(diff))
        ref_max = max(ref_max, float(ref_f.abs().max()) if ref.numel() else 0.0)
    bound = atol + rtol * ref_max
    if not worst <= bound:  # also catches NaN
        raise ExportCheckError(
            f"The exported model's outputs differ from the PyTorch model's by up to {worst:.3g}, more than the "
            f"tolerance atol + rtol*max|ref| = {atol:g} + {rtol:g}*{ref_max:.3g} = {bound:.3g}. "
            "The export is not trustworthy; it was not accepted."
        )
    return worst, ref_max


# -- writers: each returns a loaded runner (a callable on an example input -> outputs) ----------------


def _require(*modules: str) -> None:
    """ONNX export and ONNX Runtime are the optional `speed` extra; say how to get them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}, which are not installed: pip install 'tightfit[speed]'."
        )


def _input_names(example_input: Any) -> list[str]:
    """ONNX input names: a dict's keys (what a user feeds ONNX Runtime by), else ``input_0``, ..."""
    if isinstance(example_input, Mapping):
        return [str(k) for k, v in example_input.items() if isinstance(v, torch.Tensor)]
    return [f"input_{i}" for i in range(len(_flat_inputs(example_input)))]


def _batch_dims(value: Any, batch: Any) -> Any:
    """torch.export's dynamic_shapes for one argument: dim 0 of each tensor, however a dict nests it."""
    if isinstance(value, torch.Tensor):
        return {0: batch}
    if isinstance(value, Mapping):
        return {k: _batch_dims(v, batch) for k, v in value.items()}
    return None


def _export_onnx(model: nn.Module, example_input: Any, path: Path, call: tuple[tuple, dict[str, Any]] | None = None) -> None:
    """``call``: how the model is called on ``example_input``, when ``model`` cannot tell (a dtype
    wrapper takes anything); by default :func:`~tightfit.measure.analysis.model_arguments`."""
    _require("onnx", "onnxruntime")
    input_names = _input_names(example_input)
    traceable, args, kwargs = tensor_interface(model, *(call or model_arguments(model, example_input)))
    with torch.no_grad():
        n_outputs = len(output_tensors(traceable(*args, **kwargs)))
    output_names = [f"output_{i}" for i in range(n_outputs)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    # Both exporters read a trailing dict in `args` as the keyword arguments; it is always given
    # (empty when there are none) so that a forward taking one dict gets it as its argument.
    export_args = args + (kwargs,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter names nodes after modules (/layer1/conv/Conv), which
            # is how `keep_float` finds a layer's nodes; the dynamo exporter is the fallback.
            torch.onnx.export(traceable, export_args, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as legacy_error:
            try:
                batch = torch.export.Dim("batch")
                shapes = tuple(_batch_dims(a, batch) for a in args) if args else None
                if traceable is not model:  # forward(self, *tensors): the shapes of its one (variadic) parameter
                    shapes = (shapes,)
                program = torch.onnx.export(traceable, export_args, dynamo=True, external_data=False,
                                            dynamic_shapes=shapes)
                program.save(str(path))
            except Exception as dynamo_error:
                raise ArtifactError(
                    f"ONNX export failed: {type(legacy_error).__name__}: {legacy_error}; the dynamo exporter also "
                    f"failed: {type(dynamo_error).__name__}: {dynamo_error}"
                ) from dynamo_error


def _ort_session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("ONNX export checks need onnxruntime: pip install 'tightfit[speed]'.") from None

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_feed(session, example_input: Any) -> dict[str, Any]:
    tensors = _flat_inputs(example_input)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ArtifactError(f"The ONNX model takes {len(names)} input(s); the example input has {len(tensors)} tensor(s).")
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}


class _CalibrationReader:
    """ONNX Runtime's calibration protocol over example inputs (one batch per get_next)."""

    def __init__(self, session_inputs: list[str], batches: Iterable[Any]) -> None:
        self._names = session_inputs
        self._batches = list(batches)
        self._position = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._position >= len(self._batches):
            return None
        tensors = _flat_inputs(self._batches[self._position])
        self._position += 1
        return {n: t.detach().cpu().numpy() for n, t in zip(self._names, tensors)}

    def rewind(self) -> None:
        self._position = 0


def re_escape(name: str) -> str:
    """A layer name as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _node_scope(node: Any) -> str:
    """The dotted name of the module an ONNX node came from. The TorchScript exporter writes it
    into the node's name (``/layer1/conv/Conv``); the dynamo exporter, which a model the former
    cannot export falls back to (e.g. Hugging Face GPT-2), names nodes ``node_Gemm_12`` and keeps
    the module path in the metadata ``pkg.torch.onnx.name_scopes`` (modules, then the op)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return node.name.strip("/").rpartition("/")[0].replace("/", ".")


def onnx_nodes_for(onnx_path: Path, patterns: Sequence[str]) -> list[str]:
    """ONNX node names belonging to the layers matched by fnmatch ``patterns`` (dotted names)."""
    import onnx

    picked = []
    for node in onnx.load(str(onnx_path)).graph.node:
        scope = _node_scope(node)
        if any(fnmatch.fnmatchcase(scope, p) or fnmatch.fnmatchcase(scope, p + ".*") for p in patterns):
            picked.append(node.name)
            picked.append(node.name + "_MatMul")  # ORT's dynamic quantizer splits Gemm into <name>_MatMul + Add
    return picked


def _carried_over(onnx_path: Path, names: Sequence[str]) -> list[str]:
    """The nodes of ``names`` as ONNX Runtime's pre-processing left them: it fuses some (MatMul +
    Add become ``<MatMul's name>/MatMulAddFusion``) and drops the metadata they were found by."""
    import onnx

    wanted = set(names)
    picked = []
    for node in onnx.load(str(onnx_path)).graph.node:
        parts = node.name.split("/")
        if any("/".join(parts[:i]) in wanted for i in range(1, len(parts) + 1)):
            picked += [node.name, node.name + "_MatMul"]  # as in onnx_nodes_for
    return picked


#: Weights on ONNX Runtime's reduced int8 range ([-64, 64], 7 bits), activations uint8: the settings
#: that give the same answer on every x86-64 CPU. Without AVX-512 VNNI (or AVX-VNNI), ONNX Runtime's
#: uint8 x int8 kernel adds pairs of products in int16 (VPMADDUBSW), which saturates once
#: 255 * (|w1| + |w2|) > 32767; with |w| <= 64 it cannot (255 * 64 * 2 = 32640).
#: `python benchmarks/int8_saturation.py` (the tests' int8 models, max |int8 - float| / tolerance):
#: full-range weights on this AVX-512 VNNI CPU: Linear 0.0056 / 0.0237, LSTM 0.0042 / 0.0235; under
#: `qemu-x86_64 -cpu Haswell` (AVX2 only): 0.1176 (the 0.117 an AMD EPYC with AVX2 reported) and
#: 0.2286, both failing. reduce_range: 0.0066 and 0.0061 on both CPUs, identical outputs. uint8
#: weights (U8U8) are exact for Linear but not for LSTM (ONNX Runtime quantizes LSTM weights to int8
#: whatever weight_type says: 0.2286 again), and about 2.5x slower on a VNNI CPU (`--speed`: 5.03 ms
#: against 1.79 full-range and 1.69 reduce_range; reduce_range keeps the fast kernel). The search puts Int8
#: weights on this same grid (:class:`~tightfit.operators.Int8Weights`), so the export
#: re-quantizes them exactly.
PORTABLE_INT8 = {"reduce_range": True}


def _quantize_onnx(
    float_path: Path,
    out_path: Path,
    mode: str,
    keep_float: Sequence[str],
    calibration: Iterable[Any] | None,
    only: Sequence[str] | None = None,
) -> None:
    """Quantize an ONNX file with ONNX Runtime; ``only`` limits it to those layers' nodes."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exclude = onnx_nodes_for(float_path, keep_float) if keep_float else []
    include = onnx_nodes_for(float_path, [re_escape(n) for n in only]) if only else None
    if only and not include:
        raise ArtifactError(f"No ONNX node belongs to the int8 layer(s) {list(only)[:5]}; cannot quantize them.")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            exclude = _carried_over(prepared, exclude)
            include = _carried_over(prepared, include) if include is not None else None
        except Exception:  # pre-processing (shape inference, folding) is an optimisation only
            prepared = float_path
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8, per_channel=bool(only),
                             nodes_to_exclude=exclude, nodes_to_quantize=include, **PORTABLE_INT8)
            _check_int8(out_path, mode, only)
            return
        if calibration is None:
            raise ConfigError('int8="static" needs `calibration`: an iterable of example inputs (a few batches).')
        session = _ort_session(prepared, None)
        reader = _CalibrationReader([i.name for i in session.get_inputs()], calibration)
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        nodes_to_quantize=include, **PORTABLE_INT8)
        _check_int8(out_path, mode, only)


#: ONNX operators that carry int8 weights after ONNX Runtime's dynamic (integer ops) or static
#: (QDQ: DequantizeLinear of an int8 initializer) quantization
_INT8_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLSTM", "DequantizeLinear")


def _check_int8(path: Path, mode: str, only: Sequence[str] | None) -> None:
    """Refuse a file that ONNX Runtime left all float: its quantizer skips what it cannot handle
    silently, and an "int8" file without int8 weights would ship float at float's size."""
    import onnx

    if any(node.op_type in _INT8_OPS for node in onnx.load(str(path)).graph.node):
        return
    what = f"the int8 layer(s) {list(only)[:5]}" if only else "any layer of this model"
    raise ArtifactError(
        f"ONNX Runtime's {mode} quantization left {what} in float (no int8 operator in the file). "
        "Export without int8, or keep those layers out of Int8 in the strategy."
    )


def check_export_options(format: str, int8: str | None = None, dtype: str | None = None) -> None:
    """Refuse an unknown format, int8 mode or dtype (and int8 outside ONNX) before any work."""
    if format not in FORMATS:
        raise ConfigError(f"`format` must be one of {', '.join(FORMATS)}, but got {format!r}.")
    if int8 is not None and int8 not in INT8_MODES:
        raise ConfigError(f"`int8` must be one of {', '.join(INT8_MODES)} or None, but got {int8!r}.")
    if int8 is not None and format != "onnx":
        raise ConfigError(f"int8 export runs through ONNX Runtime: use format='onnx' (got {format!r}).")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(sorted(DTYPES))} or None, but got {dtype!r}.")


def export_model(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    atol: float = 1e-4,
    rtol: float = 1e-3,
    latency: Latency | None = None,
    int8: str | None = None,
    calibration: Iterable[Any] | None = None,
    keep_float: Sequence[str] | None = None,
    int8_layers: Sequence[str] | None = None,
    dtype: str | None = None,
) -> ExportReport:
    """Write ``model`` to ``path`` in ``format`` ("onnx", "torchscript" or "pt"), load it back,
    check its outputs on ``example_input`` against ``model`` and time both with ``latency``.

    ``int8`` ("dynamic"/"static", ONNX only) quantizes with ONNX Runtime; ``keep_float`` lists
    layer-name patterns left in float; ``int8_layers`` (exact names) limits int8 to those layers,
    as an ``Int8`` plan chose; ``calibration`` (static) is an iterable of inputs. The
    tolerance then has to allow for quantization error (e.g. ``rtol=0.05``): the reference is the
    float model. ``dtype`` ("bfloat16"/"float16", torchscript and pt only) stores and runs the
    model in that type behind a float32 interface (bfloat16 pays on CPUs with AMX; check the
    tolerance accordingly). Raises :class:`ExportCheckError` when the outputs differ beyond the
    tolerance.
    """
    check_export_options(format, int8, dtype)
    if dtype is not None and format == "onnx":
        raise ConfigError("`dtype` applies to torchscript and pt exports; for ONNX use int8 (ONNX Runtime's CPU "
                          "kernels are not faster in 16-bit floats).")
    if example_input is None:
        raise ConfigError("export_model needs `example_input` to trace the model and check its outputs.")
    if not (atol >= 0 and rtol >= 0):
        raise ConfigError(f"`atol` and `rtol` must be >= 0, but got atol={atol!r}, rtol={rtol!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bake(model).eval()
    check_input = latency.example_input if latency is not None else example_input
    with torch.inference_mode():
        reference = [t.clone() for t in output_tensors(call_model(model, check_input))]
    if not reference:
        raise ConfigError("The model's output holds no tensor; nothing to export or check.")

    # How the model is called is read from the model itself: a dtype wrapper takes anything, and a
    # loaded TorchScript module's signature cannot be read, so neither could tell a forward taking
    # one dict from one taking keyword arguments.
    args, kwargs = model_arguments(model, example_input)
    check_args, check_kwargs = model_arguments(model, check_input)
    threads = latency.threads if latency is not None else None
    reference_model = model
    if dtype is not None:
        model = CastWrapper(copy.deepcopy(model), DTYPES[dtype]).eval()
    if format == "onnx":
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx" if int8 else path
            _export_onnx(model, example_input, float_path, call=(args, kwargs))
            if int8:
                _quantize_onnx(float_path, path, int8, list(keep_float or []), calibration, only=int8_layers)
        session = _ort_session(path, threads)
        feed = _ort_feed(session, check_input)

        def run() -> Any:
            return session.run(None, feed)
    elif format == "torchscript":
        traceable, args, kwargs = tensor_interface(model, args, kwargs)
        flat = traceable is not model  # traced on the input's tensors, positionally
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kwargs:
                    traced = torch.jit.trace(traceable, example_kwarg_inputs=kwargs, check_trace=False)
                else:
                    traced = torch.jit.trace(traceable, args, check_trace=False)
        except Exception as exc:
            raise ArtifactError(f"TorchScript export failed: {type(exc).__name__}: {str(exc)[:500]} "
                                "Export with format='onnx' or 'pt' instead.") from exc
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path)).eval()

        def run() -> Any:
            with torch.inference_mode():
                if flat:
                    return output_tensors(loaded(*_flat_inputs(check_input)))
                return output_tensors(loaded(*check_args, **check_kwargs))
    else:
        buffer = io.BytesIO()
        torch.save(copy.deepcopy(model), buffer)
        path.write_bytes(buffer.getvalue())
        loaded = torch.load(str(path), weights_only=False).eval()

        def run() -> Any:
            with torch.inference_mode():
                return output_tensors(loaded(*check_args, **check_kwargs))

    try:
        worst, ref_max = compare_outputs(reference, [torch.as_tensor(o) for o in run()], atol, rtol)
    except ExportCheckError as exc:
        path.unlink(missing_ok=True)  # a file that failed its check is not left where it could be shipped
        raise ExportCheckError(f"{exc} {path} was removed.") from None
    timed = latency.time(run) if latency is not None else None
    reference_timed = latency(reference_model) if latency is not None else None
    return ExportReport(
        path=str(path),
        format=format,
        size_bytes=path.stat().st_size,
        max_abs_diff=worst,
        reference_max_abs=ref_max,
        atol=atol,
        rtol=rtol,
        int8=int8,
        dtype=dtype,
        float_layers=list(keep_float or []),
        int8_layers=list(int8_layers or []),
        latency_ms=timed.median_ms if timed else None,
        latency_iqr_ms=timed.iqr_ms if timed else None,
        reference_latency_ms=reference_timed.median_ms if reference_timed else None,
        latency_batch_size=latency.batch_size if latency is not None else None,
        threads=timed.threads if timed else None,
    )


def export_run(
    run_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    out: str | os.PathLike | None = None,
    atol: float = 1e-4,
    rtol: float | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    int8: str | None = None,
    keep_float: Sequence[str] | None = None,
    dtype: str | None = None,
) -> ExportReport:
    """Export a finished run's model (``model.tfz``), checked on the run's stored example input.

    A plan with ``Int8`` layers exports those layers in int8 (ONNX). ``rtol`` defaults to 1e-3,
    0.05 when int8 is applied (activations are quantized at run time; the reference is float32),
    0.02 with a 16-bit ``dtype``.
    Static int8 calibrates on that example input only. Writes ``<file>.json`` (the report, with
    the speedup over the baseline latency the search measured, when it measured one) next to it.
    """
    check_export_options(format, int8, dtype)  # before reading the run: `--format xyz` is an error, not a traceback
    from ..pipeline import EXAMPLE_INPUT_FILE
    from ..run_dir import MODEL_FILE, SUMMARY_FILE
    from .artifact import load_model

    root = Path(run_dir)
    model_path, input_path = root / MODEL_FILE, root / EXAMPLE_INPUT_FILE
    if not model_path.exists():
        raise ConfigError(f"{str(root)!r} holds no {MODEL_FILE}: the run has not finished or found no feasible model.")
    if not input_path.exists():
        raise ConfigError(
            f"{str(root)!r} holds no {EXAMPLE_INPUT_FILE}; export checks outputs on the example input. "
            "Run compress with `example_input=` (the run directory then keeps it)."
        )
    from ..operators.int8 import plan_int8_layers
    from .artifact import read_manifest

    model = load_model(model_path)
    example_input = torch.load(input_path, weights_only=False)
    planned = plan_int8_layers(read_manifest(model_path).get("plan"))
    if planned and format == "onnx" and int8 is None:
        int8 = "dynamic"
    if rtol is None:
        rtol = 0.05 if int8 else 0.02 if dtype else 1e-3
    latency = Latency(example_input, batch_size=batch_size, threads=threads)
    tag = ".int8" if int8 else f".{dtype}" if dtype else ""
    target = Path(out) if out is not None else root / "export" / f"model{tag}{SUFFIX[format]}"
    calibration = [example_input] if int8 == "static" else None
    report = export_model(model, example_input, target, format=format, atol=atol, rtol=rtol, latency=latency,
                          int8=int8, calibration=calibration, keep_float=keep_float,
                          int8_layers=planned if planned and int8 == "dynamic" else None, dtype=dtype)
    record = report.to_dict()
    summary_path = root / SUMMARY_FILE
    if summary_path.exists():
        baseline = (json.loads(summary_path.read_text()).get("baseline") or {})
        if baseline.get("latency_ms") and report.latency_ms:
            record["baseline_latency_ms_in_search"] = baseline["latency_ms"]
            record["speedup_vs_baseline_in_search"] = baseline["latency_ms"] / report.latency_ms
    target.with_name(target.name + ".json").write_text(json.dumps(record, indent=2))
    return report


__all__ = ["ExportCheckError", "ExportReport", "FORMATS", "compare_outputs", "export_model", "export_run", "with_batch_size"]
