"""Latency, measured: the wall time of one forward pass on this machine, with its spread.

Timed with ``torch.utils.benchmark`` (which sets the thread count and synchronizes), after a few
warm-up calls, as the median of several blocks of runs. Dense kernels take the same time whatever
the weights' values, so a result is cached per *architecture* (module types, shapes and dtypes):
two trials that only mask or round weights cost one measurement.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..calling import call_model
from ..errors import ConfigError

RUNTIMES = ("pytorch", "onnxruntime")


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement. ``median_ms`` per forward pass of ``batch_size`` samples;
    ``iqr_ms`` the interquartile range over ``blocks`` blocks of ``runs`` calls in all."""

    median_ms: float
    iqr_ms: float
    runs: int
    blocks: int
    batch_size: int | None
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_batch_size(example_input: Any, batch_size: int | None) -> Any:
    """The example input with its leading (batch) dimension set to ``batch_size`` by repeating its
    first sample; unchanged when ``batch_size`` is None."""
    if batch_size is None:
        return example_input
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() == 0:
            return example_input
        first = example_input[:1]
        return first.repeat(batch_size, *([1] * (example_input.dim() - 1)))
    if isinstance(example_input, Mapping):
        return {k: with_batch_size(v, batch_size) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(with_batch_size(v, batch_size) for v in example_input)
    return example_input


def architecture_key(model: nn.Module) -> str:
    """A digest of what decides a dense model's speed: module tree, types, tensor shapes/dtypes."""
    parts = [type(model).__qualname__, repr(model)]
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):  # baking may reorder a module's tensors
        parts.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Latency:
    """Measure a model's forward latency on ``example_input`` (a tensor, tuple of args, dict of kwargs).

    ``batch_size`` resizes the input's first dimension (None: as given); ``threads`` is the number
    of intra-op threads (None: torch's current setting). Call with a model to get a
    :class:`LatencyResult`; parametrized models are baked first (what a user ships is timed).
    ``runtime="onnxruntime"`` times the model exported to ONNX in an onnxruntime session instead,
    with the layers an ``Int8`` plan marked quantized to int8 (that is where int8 is fast).
    """

    def __init__(
        self,
        example_input: Any,
        *,
        batch_size: int | None = None,
        threads: int | None = None,
        min_run_time: float = 0.3,
        warmup: int = 3,
        runtime: str = "pytorch",
    ) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"Latency: `runtime` must be one of {RUNTIMES}, but got {runtime!r}.")
        self.runtime = runtime
        if example_input is None:
            raise ConfigError("Latency: `example_input` is required (a tensor, tuple of args or dict of kwargs).")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"Latency: `batch_size` must be a whole number >= 1 or None, but got {batch_size!r}.")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"Latency: `threads` must be a whole number >= 1 or None, but got {threads!r}.")
        if not min_run_time > 0:
            raise ConfigError(f"Latency: `min_run_time` must be > 0 seconds, but got {min_run_time!r}.")
        self.example_input = with_batch_size(example_input, batch_size)
        self.batch_size = batch_size
        self.threads = threads
        self.min_run_time = float(min_run_time)
        self.warmup = int(warmup)
        self._cache: dict[str, LatencyResult] = {}
        #: how many calls were answered from the cache / by timing
        self.hits = 0
        self.misses = 0

    def describe(self) -> str:
        runtime = "" if self.runtime == "pytorch" else f", runtime={self.runtime!r}"
        return f"Latency(batch_size={self.batch_size}, threads={self.threads or torch.get_num_threads()}{runtime})"

    def __call__(self, model: nn.Module) -> LatencyResult:
        from ..export.artifact import bake

        marked: list[str] = []
        if self.runtime == "onnxruntime":
            from ..operators.int8 import int8_layers

            marked = int8_layers(model)
        baked = bake(model).eval()
        key = architecture_key(baked) + f"|{self.runtime}|int8:" + ",".join(marked)
        if key in self._cache:
            self.hits += 1
            return self._cache[key]
        self.misses += 1
        example = self.example_input
        if self.runtime == "onnxruntime":
            result = self._time_onnxruntime(baked, marked)
        else:

            def forward() -> Any:
                with torch.inference_mode():
                    return call_model(baked, example)

            result = self.time(forward)
        self._cache[key] = result
        return result

    def _time_onnxruntime(self, model: nn.Module, int8_layers: list[str]) -> LatencyResult:
        import tempfile
        from pathlib import Path

        from ..export.onnx import export_onnx, ort_feed, ort_session, quantize_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, self.example_input, path)
            if int8_layers:
                quantized = Path(tmp) / "model.int8.onnx"
                quantize_onnx(path, quantized, "dynamic", [], None, only=int8_layers)
                path = quantized
            session = ort_session(path, self.threads or torch.get_num_threads())
        feed = ort_feed(session, self.example_input)
        return self.time(lambda: session.run(None, feed))

    def time(self, fn: Callable[[], Any]) -> LatencyResult:
        """Time any zero-argument callable (e.g. an onnxruntime session run) the same way, uncached."""
        from torch.utils import benchmark

        threads = self.threads or torch.get_num_threads()
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            # At least `warmup` calls and a fraction of the timing budget: the first large calls of a
            # process are slower (allocator, caches), and a baseline timed first would look slow.
            started, calls = time.perf_counter(), 0
            while calls < self.warmup or time.perf_counter() - started < self.min_run_time / 3:
                fn()
                calls += 1
        finally:
            torch.set_num_threads(previous)
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        measured = timer.blocked_autorange(min_run_time=self.min_run_time)
        return LatencyResult(
            median_ms=measured.median * 1e3,
            iqr_ms=measured.iqr * 1e3,
            runs=int(measured.number_per_run * len(measured.times)),
            blocks=len(measured.times),
            batch_size=self.batch_size,
            threads=threads,
        )
