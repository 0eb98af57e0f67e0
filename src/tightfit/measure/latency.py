"""Latency, measured: the wall time of one forward pass on this machine, with its spread.

Timed with ``torch.utils.benchmark`` (which sets the thread count and synchronizes), after a few
warm-up calls, as the median of several blocks of runs. Dense kernels take the same time whatever
the weights' values, so a result is cached per *architecture* (module types, shapes and dtypes):
two trials that only mask or round weights cost one measurement.

With a *reference* (:meth:`Latency.set_reference`; a run sets the original model), every later
model is timed in alternating blocks with the reference, and its latency is the reference's time
times the median of the per-round ratios: a load that comes and goes on a shared machine slows
both sides of a round alike, so the ratio stays where a lone timing drifts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..calling import call_model
from ..errors import ConfigError

RUNTIMES = ("pytorch", "onnxruntime")

#: the wall clock of warm-up and paired timing (a test replaces it to simulate a changing load)
clock = time.perf_counter


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
        self._reference: tuple[str, Callable[[], Any], LatencyResult] | None = None
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
        fn = self._session(baked, marked)
        if self._reference is not None and key != self._reference[0]:
            result = self.time_against(fn, self._reference[1], self._reference[2])
        else:
            result = self.time(fn)
        self._cache[key] = result
        return result

    @property
    def reference(self) -> LatencyResult | None:
        """The reference's measurement (:meth:`set_reference`), None without one."""
        return None if self._reference is None else self._reference[2]

    def set_reference(self, model: nn.Module, median_ms: float | None = None) -> LatencyResult:
        """Time ``model`` and make it the reference every later, uncached model is timed against
        (alternating blocks, :meth:`time_against`). Returns the reference's own measurement, with
        ``median_ms`` in place of the one timed when given (a resumed run keeps its baseline's, so
        its earlier and later trials are on one scale)."""
        from ..export.artifact import bake

        marked: list[str] = []
        if self.runtime == "onnxruntime":
            from ..operators.int8 import int8_layers

            marked = int8_layers(model)
        # the run's original, unparametrized and in eval mode, is timed as it is: no second copy of
        # a large model held for the whole run
        plain = not model.training and not any(parametrize.is_parametrized(m) for m in model.modules())
        baked = model if plain else bake(model).eval()
        key = architecture_key(baked) + f"|{self.runtime}|int8:" + ",".join(marked)
        fn = self._session(baked, marked)
        self._reference = None
        self._cache.pop(key, None)
        result = self.time(fn)
        if median_ms is not None:
            result = dataclasses.replace(result, median_ms=float(median_ms))
        self._cache[key] = result
        self._reference = (key, fn, result)
        return result

    def _session(self, baked: nn.Module, marked: list[str]) -> Callable[[], Any]:
        """A zero-argument callable running one forward pass of ``baked`` in this meter's runtime."""
        if self.runtime == "onnxruntime":
            return self._onnxruntime_call(baked, marked)
        example = self.example_input

        def forward() -> Any:
            with torch.inference_mode():
                return call_model(baked, example)

        return forward

    def _onnxruntime_call(self, model: nn.Module, int8_layers: list[str]) -> Callable[[], Any]:
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
        return lambda: session.run(None, feed)

    def _warm(self, fn: Callable[[], Any], threads: int) -> float:
        """Warm-up calls of ``fn``; returns the seconds of its last call."""
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            # At least `warmup` calls and a fraction of the timing budget: the first large calls of a
            # process are slower (allocator, caches), and a baseline timed first would look slow.
            started, calls, last = clock(), 0, 0.0
            while calls < self.warmup or clock() - started < self.min_run_time / 3:
                before = clock()
                fn()
                last = clock() - before
                calls += 1
        finally:
            torch.set_num_threads(previous)
        return last

    def time(self, fn: Callable[[], Any]) -> LatencyResult:
        """Time any zero-argument callable (e.g. an onnxruntime session run) the same way, uncached."""
        from torch.utils import benchmark

        threads = self.threads or torch.get_num_threads()
        self._warm(fn, threads)
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

    def time_against(
        self, fn: Callable[[], Any], reference: Callable[[], Any], reference_result: LatencyResult
    ) -> LatencyResult:
        """Time ``fn`` in rounds that also time ``reference`` (which measured ``reference_result``),
        alternating which goes first; the result is ``reference_result.median_ms`` times the median
        per-round ratio (its interquartile range likewise), uncached."""
        threads = self.threads or torch.get_num_threads()
        per_call = max(self._warm(fn, threads), 1e-6)
        reference_call = max(self._warm(reference, threads), 1e-6)
        # each side gets the timing budget a lone measurement has, in PAIRED_ROUNDS rounds of at
        # least one call each (so a paired measurement costs about twice a lone one)
        calls = max(1, int(self.min_run_time / PAIRED_ROUNDS / per_call))
        reference_calls = max(1, int(self.min_run_time / PAIRED_ROUNDS / reference_call))
        ratios = []
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            for i in range(PAIRED_ROUNDS):
                sides = [(fn, calls), (reference, reference_calls)]
                spent = [_block(*side) for side in (sides if i % 2 == 0 else sides[::-1])]
                own, ref = spent if i % 2 == 0 else spent[::-1]
                ratios.append(own / ref)
        finally:
            torch.set_num_threads(previous)
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return LatencyResult(
            median_ms=reference_result.median_ms * median,
            iqr_ms=reference_result.median_ms * (q3 - q1),
            runs=calls * PAIRED_ROUNDS,
            blocks=PAIRED_ROUNDS,
            batch_size=self.batch_size,
            threads=threads,
        )


#: rounds of a paired timing (:meth:`Latency.time_against`): each round times the model and the
#: reference once, so a load spike spoils a round, not the median of them
PAIRED_ROUNDS = 11


def _block(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``calls`` calls of ``fn``."""
    started = clock()
    for _ in range(calls):
        fn()
    return (clock() - started) / calls
