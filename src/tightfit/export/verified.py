"""Verified export: write a model as ONNX or TorchScript, load it back the way a user would (onnxruntime for ONNX), check its outputs against the PyTorch model, and time it.

A failed check raises :class:`ExportCheckError`; it is never a warning. The check is
``max|exported - reference| <= atol + rtol * max|reference|`` over every output element, on the
example input (at the batch size the latency is measured at, when that differs).

``int8="dynamic"`` (weights int8, activations quantized on the fly: Linear/MatMul/LSTM) and
``int8="static"`` (activations too, scales from a calibration set: convolutions) run through
ONNX Runtime's quantization tools; the file written is the int8 model, so its size is what ships.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calling import call_model, model_arguments, output_tensors
from ..errors import ArtifactError, ConfigError
from ..measure.latency import Latency, with_batch_size
from .artifact import bake
from .onnx import export_onnx, flat_inputs, ort_feed, ort_session, quantize_onnx, tensor_interface

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
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


def compare_outputs(
    reference: Sequence[torch.Tensor], exported: Sequence[Any], atol: float, rtol: float
) -> tuple[float, float]:
    """(max abs difference, max abs reference); raises ExportCheckError beyond the tolerance."""
    if len(reference) != len(exported):
        raise ExportCheckError(
            f"The exported model returns {len(exported)} output(s); the PyTorch model returns {len(reference)}."
        )
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


def _check_export_arguments(
    format: str, int8: str | None, dtype: str | None, example_input: Any, atol: float, rtol: float
) -> None:
    check_export_options(format, int8, dtype)
    if dtype is not None and format == "onnx":
        raise ConfigError(
            "`dtype` applies to torchscript exports; for ONNX use int8 (ONNX Runtime's CPU "
            "kernels are not faster in 16-bit floats)."
        )
    if example_input is None:
        raise ConfigError("export_model needs `example_input` to trace the model and check its outputs.")
    if not (atol >= 0 and rtol >= 0):
        raise ConfigError(f"`atol` and `rtol` must be >= 0, but got atol={atol!r}, rtol={rtol!r}.")


def _reference_outputs(model: nn.Module, check_input: Any) -> list[torch.Tensor]:
    with torch.inference_mode():
        reference = [t.clone() for t in output_tensors(call_model(model, check_input))]
    if not reference:
        raise ConfigError("The model's output holds no tensor; nothing to export or check.")
    return reference


def _checked(reference: list[torch.Tensor], run: Any, atol: float, rtol: float, path: Path) -> tuple[float, float]:
    """compare_outputs of the written file's outputs; a file that fails its check is removed."""
    try:
        return compare_outputs(reference, [torch.as_tensor(o) for o in run()], atol, rtol)
    except ExportCheckError as exc:
        path.unlink(missing_ok=True)  # a file that failed its check is not left where it could be shipped
        raise ExportCheckError(f"{exc} {path} was removed.") from None


def _torchscript_runner(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    path: Path,
    check_input: Any,
    check_call: tuple[tuple, dict[str, Any]],
) -> Any:
    """Trace ``model`` to TorchScript at ``path``, load it back; a runner of the loaded model on the check input."""
    check_args, check_kwargs = check_call
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
        raise ArtifactError(
            f"TorchScript export failed: {type(exc).__name__}: {str(exc)[:500]} "
            "Export with format='onnx' instead, or ship the compressed model as a .tfz (tightfit.save)."
        ) from exc
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path)).eval()

    def run() -> Any:
        with torch.inference_mode():
            if flat:
                return output_tensors(loaded(*flat_inputs(check_input)))
            return output_tensors(loaded(*check_args, **check_kwargs))

    return run


def check_export_options(format: str, int8: str | None = None, dtype: str | None = None) -> None:
    """Refuse an unknown format, int8 mode or dtype (and int8 outside ONNX) before any work."""
    if format == "pt":
        raise ConfigError(
            "format='pt' (a whole pickled module) is not written: loading it can run any code. Use "
            "format='torchscript' for a file PyTorch loads, 'onnx', or tightfit.save for a .tfz."
        )
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
    """Write ``model`` to ``path`` in ``format`` ("onnx" or "torchscript"), load it back,
    check its outputs on ``example_input`` against ``model`` and time both with ``latency``.

    ``int8`` ("dynamic"/"static", ONNX only) quantizes with ONNX Runtime; ``keep_float`` lists
    layer-name patterns left in float; ``int8_layers`` (exact names) limits int8 to those layers,
    as an ``Int8`` plan chose; ``calibration`` (static) is an iterable of inputs. The
    tolerance then has to allow for quantization error (e.g. ``rtol=0.05``): the reference is the
    float model. ``dtype`` ("bfloat16"/"float16", torchscript only) stores and runs the
    model in that type behind a float32 interface (bfloat16 pays on CPUs with AMX; check the
    tolerance accordingly). Raises :class:`ExportCheckError` when the outputs differ beyond the
    tolerance.
    """
    _check_export_arguments(format, int8, dtype, example_input, atol, rtol)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bake(model).eval()
    check_input = latency.example_input if latency is not None else example_input
    reference = _reference_outputs(model, check_input)

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
            export_onnx(model, example_input, float_path, call=(args, kwargs))
            if int8:
                quantize_onnx(float_path, path, int8, list(keep_float or []), calibration, only=int8_layers)
        session = ort_session(path, threads)
        feed = ort_feed(session, check_input)

        def run() -> Any:
            return session.run(None, feed)
    else:
        run = _torchscript_runner(model, args, kwargs, path, check_input, (check_args, check_kwargs))

    worst, ref_max = _checked(reference, run, atol, rtol, path)
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
    model: nn.Module | None = None,
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

    ``model`` is a fresh instance of the model the run compressed (``tightfit export RUN_DIR
    --config CONFIG`` builds it from the run's config): the file's tensors are loaded into it.
    Without it, the file's data-only architecture is rebuilt (models of ``torch.nn`` layers only;
    otherwise the ArtifactError says to pass ``model=``). Nothing in the run directory is unpickled,
    so a file in it that someone else made runs no code.

    A plan with ``Int8`` layers exports those layers in int8 (ONNX). ``rtol`` defaults to 1e-3,
    0.05 when int8 is applied (activations are quantized at run time; the reference is float32),
    0.02 with a 16-bit ``dtype``.
    Static int8 calibrates on that example input only. Writes ``<file>.json`` (the report, with
    the speedup over the baseline latency the search measured, when it measured one) next to it.
    """
    check_export_options(format, int8, dtype)  # before reading the run: `--format xyz` is an error, not a traceback
    from .._io import write_text_atomic
    from ..run_dir import EXAMPLE_INPUT_FILE, MODEL_FILE, SUMMARY_FILE
    from .artifact import load_model

    root = Path(run_dir)
    model_path, input_path = root / MODEL_FILE, root / EXAMPLE_INPUT_FILE
    _check_run_export(root, model)
    from ..operators.int8 import plan_int8_layers
    from .artifact import read_manifest

    model = load_model(model_path, model)
    example_input = _read_example_input(input_path)
    planned = plan_int8_layers(read_manifest(model_path).get("plan"))
    if planned and format == "onnx" and int8 is None:
        int8 = "dynamic"
    if rtol is None:
        rtol = 0.05 if int8 else 0.02 if dtype else 1e-3
    latency = Latency(example_input, batch_size=batch_size, threads=threads)
    tag = ".int8" if int8 else f".{dtype}" if dtype else ""
    target = Path(out) if out is not None else root / "export" / f"model{tag}{SUFFIX[format]}"
    calibration = [example_input] if int8 == "static" else None
    report = export_model(
        model,
        example_input,
        target,
        format=format,
        atol=atol,
        rtol=rtol,
        latency=latency,
        int8=int8,
        calibration=calibration,
        keep_float=keep_float,
        int8_layers=planned if planned and int8 == "dynamic" else None,
        dtype=dtype,
    )
    record = report.to_dict()
    record.update(_speedup_in_search(_read_json(root / SUMMARY_FILE), report))
    write_text_atomic(target.with_name(target.name + ".json"), json.dumps(record, indent=2))
    return report


def _check_run_export(root: Path, model: Any) -> None:
    """What export_run needs, checked before anything is read: a module (if given), the model file
    and the example input."""
    from ..run_dir import EXAMPLE_INPUT_FILE, MODEL_FILE

    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(
            f"export_run: `model=` must be a fresh instance of the model the run compressed, not {type(model).__name__}; "
            f"{MODEL_FILE} is loaded into it, so that no code from the run directory runs."
        )
    if not (root / MODEL_FILE).exists():
        raise ConfigError(f"{str(root)!r} holds no {MODEL_FILE}: the run has not finished or found no feasible model.")
    if not (root / EXAMPLE_INPUT_FILE).exists():
        raise ConfigError(
            f"{str(root)!r} holds no {EXAMPLE_INPUT_FILE}; export checks outputs on the example input. "
            "Run compress with `example_input=` (the run directory then keeps it)."
        )


def _speedup_in_search(summary: dict[str, Any] | None, report: ExportReport) -> dict[str, Any]:
    """The baseline latency the search measured (summary.json) and the export's speedup over it,
    when both are there."""
    if summary is None:
        return {}
    baseline = summary.get("baseline") or {}
    if isinstance(baseline, dict) and isinstance(baseline.get("latency_ms"), (int, float)) and report.latency_ms:
        return {
            "baseline_latency_ms_in_search": baseline["latency_ms"],
            "speedup_vs_baseline_in_search": baseline["latency_ms"] / report.latency_ms,
        }
    return {}


def _read_example_input(path: Path) -> Any:
    """The run's example input: tensors (in tuples, lists, dicts), read as data only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses all but tensors and containers, in many ways
        # torch's own message advises turning weights_only off; quote only what it refused
        lines = [ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower() or "error:" in ln.lower()]
        reason = lines[0][:200] if lines else type(exc).__name__
        raise ConfigError(
            f"{str(path)!r} is not an example input tightfit can read as data ({reason}); it was not written by "
            "tightfit, or is damaged. Nothing in it was run. Delete it and run compress again with `example_input=`."
        ) from None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = [
    "ExportCheckError",
    "ExportReport",
    "FORMATS",
    "compare_outputs",
    "export_model",
    "export_run",
    "with_batch_size",
]
