"""ONNX plumbing shared by verified export (:mod:`tightfit.export.verified`) and latency timing
(:class:`tightfit.measure.Latency` with ``runtime="onnxruntime"``): a model's inputs and outputs as
flat lists of tensors, export to ONNX, an ONNX Runtime session and its feed, and int8 quantization
with ONNX Runtime."""

from __future__ import annotations

import ast
import copy
import fnmatch
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calling import model_arguments, output_tensors, split_arguments
from ..errors import ArtifactError, ConfigError

# -- inputs and outputs as flat lists of tensors ------------------------------------------------------


def flat_inputs(example_input: Any) -> list[torch.Tensor]:
    """The input's tensors in the order the exported model takes them (:func:`_argument_tensors`)."""
    return _argument_tensors(*split_arguments(example_input))


def _plain_outputs(output: Any) -> bool:
    """Whether an output is what the ONNX and TorchScript tracers take as it is: a tensor, or a
    tuple/list of tensors."""
    return isinstance(output, torch.Tensor) or (
        isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output)
    )


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
    :func:`flat_inputs`; its other values are kept as constants) and returns
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


# -- writers: each returns a loaded runner (a callable on an example input -> outputs) ----------------


def require_onnx(*modules: str) -> None:
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
    return [f"input_{i}" for i in range(len(flat_inputs(example_input)))]


def _batch_dims(value: Any, batch: Any) -> Any:
    """torch.export's dynamic_shapes for one argument: dim 0 of each tensor, however a dict nests it."""
    if isinstance(value, torch.Tensor):
        return {0: batch}
    if isinstance(value, Mapping):
        return {k: _batch_dims(v, batch) for k, v in value.items()}
    return None


def export_onnx(
    model: nn.Module, example_input: Any, path: Path, call: tuple[tuple, dict[str, Any]] | None = None
) -> None:
    """``call``: how the model is called on ``example_input``, when ``model`` cannot tell (a dtype
    wrapper takes anything); by default :func:`~tightfit.measure.analysis.model_arguments`."""
    require_onnx("onnx", "onnxruntime")
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
            torch.onnx.export(
                traceable,
                export_args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as legacy_error:
            try:
                batch = torch.export.Dim("batch")
                shapes = tuple(_batch_dims(a, batch) for a in args) if args else None
                if traceable is not model:  # forward(self, *tensors): the shapes of its one (variadic) parameter
                    shapes = (shapes,)
                program = torch.onnx.export(
                    traceable, export_args, dynamo=True, external_data=False, dynamic_shapes=shapes
                )
                assert program is not None  # dynamo=True returns the program (None is the legacy exporter's)
                program.save(str(path))
            except Exception as dynamo_error:
                raise ArtifactError(
                    f"ONNX export failed: {type(legacy_error).__name__}: {legacy_error}; the dynamo exporter also "
                    f"failed: {type(dynamo_error).__name__}: {dynamo_error}"
                ) from dynamo_error


def ort_session(path: Path, threads: int | None) -> Any:  # an onnxruntime.InferenceSession
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


def ort_feed(session: Any, example_input: Any) -> dict[str, Any]:
    tensors = flat_inputs(example_input)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ArtifactError(
            f"The ONNX model takes {len(names)} input(s); the example input has {len(tensors)} tensor(s)."
        )
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
        tensors = flat_inputs(self._batches[self._position])
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


def carried_over(onnx_path: Path, names: Sequence[str]) -> list[str]:
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


def quantize_onnx(
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
            exclude = carried_over(prepared, exclude)
            include = carried_over(prepared, include) if include is not None else None
        except Exception:  # pre-processing (shape inference, folding) is an optimisation only
            prepared = float_path
        if mode == "dynamic":
            quantize_dynamic(
                str(prepared),
                str(out_path),
                weight_type=QuantType.QInt8,
                per_channel=bool(only),
                nodes_to_exclude=exclude,
                nodes_to_quantize=include,
                **PORTABLE_INT8,
            )
            _check_int8(out_path, mode, only)
            return
        if calibration is None:
            raise ConfigError('int8="static" needs `calibration`: an iterable of example inputs (a few batches).')
        session = ort_session(prepared, None)
        reader = _CalibrationReader([i.name for i in session.get_inputs()], calibration)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            nodes_to_quantize=include,
            **PORTABLE_INT8,
        )
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
