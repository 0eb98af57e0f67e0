"""Calibration passes that run one repeated block instead of the whole model.

A transformer runs a list of like blocks (an ``nn.ModuleList``) in turn, each block's output the
next one's input. Collecting a layer's statistics by running the model up to that layer costs a
pass through every block before it: with L calibrated layers in B blocks, about B*L/2 block runs
(tiny-lm, 16 layers in 4 blocks: about 30). Instead the inputs of the block holding the layer
(positional and keyword arguments) are kept per calibration batch, each layer's statistics come
from running its block alone on them, and once a block's layers are compressed its outputs become
the next block's inputs (:class:`BlockCursor`): about 2 block runs per block.

That gives exactly the inputs of the whole-model passes only where the model hands each block's
output to the next block unchanged and passes the other arguments through. :func:`survey` checks it
on the first calibration batch, before any layer is compressed, in the pass that finds the layers'
order: block k+1 receives block k's output and the same other arguments; a block leaves its inputs
unchanged and (the first block of each class) gives the same output when run again on them; no
argument is an object that may carry state between blocks (a key/value cache); each block runs
once per forward, in order; the calibrated layers inside a block run only within it. Where a check
fails, every pass runs the whole model (the reason is reported). Memory: one block's inputs over
the calibration batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..measure.analysis import call_model
from .calibration import StopPass

#: Argument types a block can be replayed with: values, not objects that may change between calls.
PLAIN = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)

Inputs = tuple[tuple, dict[str, Any]]


@dataclass
class Blocks:
    """An ``nn.ModuleList`` (``name``) whose blocks' inputs may be cached."""

    name: str
    modules: list[nn.Module]

    def index(self, layer: str) -> int | None:
        """Which block holds ``layer`` (a module name), or None."""
        prefix = f"{self.name}." if self.name else ""
        if not layer.startswith(prefix):
            return None
        head = layer[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.modules) else None


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, PLAIN)


def _same(a: Any, b: Any, exact: bool = True) -> bool:
    """Equal values (tensors element-wise; ``exact=False``: up to float rounding), nested alike."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b) if exact or not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], exact) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, exact) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def next_inputs(output: Any, args: tuple, kwargs: dict[str, Any]) -> Inputs | None:
    """The next block's inputs: this block's output (its first tensor, where it returns a tuple)
    in place of its first positional argument, the other arguments as they were; None where the
    block takes no positional argument or returns no tensor first."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    hidden = output[0] if isinstance(output, (tuple, list)) and output else output
    if not args or not isinstance(hidden, torch.Tensor):
        return None
    return (hidden, *args[1:]), kwargs


class _Survey:
    """The hooks of :func:`survey`: the layers' order and calls, and each failed block check's
    reason (the first one counts)."""

    def __init__(self, blocks: Blocks | None, layers: dict[str, nn.Module]) -> None:
        self.blocks = blocks
        self.order: list[str] = []
        self.calls = dict.fromkeys(layers, 0)
        self.why: str | None = None
        self.runs = [0] * (len(blocks.modules) if blocks is not None else 0)
        self.active: int | None = None
        self.replaying = False
        self.replayed: set[type] = set()
        self.saved: Inputs | None = None
        self.expected: Inputs | None = None

    def fail(self, why: str) -> None:
        self.why = self.why or why

    def layer_runs(self, name: str) -> None:
        if self.replaying:
            return
        if self.calls[name] == 0:
            self.order.append(name)
        self.calls[name] += 1
        k = self.blocks.index(name) if self.blocks is not None else None
        if k is not None and self.active != k:
            self.fail(f"{name} runs outside its block")

    def before(self, k: int, args: tuple, kwargs: dict) -> None:
        if self.replaying:
            return
        self.runs[k] += 1
        if self.runs[k] > 1 or k != sum(1 for r in self.runs if r) - 1:
            self.fail(f"block {k} runs more than once or out of order in one forward")
        elif k > 0 and (self.expected is None or not _same((args, kwargs), self.expected)):
            self.fail(f"block {k}'s inputs are not block {k - 1}'s output and the same other arguments")
        bad = [type(v).__name__ for v in (*args, *kwargs.values()) if not _plain(v)]
        if bad:
            self.fail(f"block {k} takes a {bad[0]} argument, which may carry state between calls (a cache)")
        self.saved, self.active = _clone((args, kwargs)), k

    def after(self, k: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.replaying:
            return
        self.active = None
        if self.why is not None or self.saved is None:
            return
        if not _same((args, kwargs), self.saved):
            self.fail(f"block {k} changes its inputs in place")
            return
        if type(module) not in self.replayed:  # once per class: what a block's output depends on is its code
            self.replayed.add(type(module))
            self.replaying = True
            try:
                again = module(*_clone(self.saved[0]), **_clone(self.saved[1]))
            finally:
                self.replaying = False
            if not _same(again, output, exact=False):
                self.fail(f"block {k} gives another output when run again on the same inputs")
        self.expected = next_inputs(output, args, kwargs)
        if self.expected is None:
            self.fail(f"block {k} takes no positional argument or returns no tensor first")


def choose_blocks(layers: Sequence[str], model: nn.Module) -> Blocks | None:
    """The ``nn.ModuleList`` of ``model`` holding the most of ``layers`` (module names; the
    outermost of equals), or None."""
    best: tuple[int, Blocks] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            blocks = Blocks(name, list(module))
            inside = sum(blocks.index(n) is not None for n in layers)
            if inside and (best is None or inside > best[0]):
                best = (inside, blocks)
    return best[1] if best is not None else None


def survey(
    model: nn.Module, layers: dict[str, nn.Module], batch: Any, blocks: Blocks | None
) -> tuple[list[str], dict[str, int], str | None]:
    """One forward of ``batch`` (no gradient): the names of ``layers`` in the order they first run
    (those that never run left out), how often each runs, and why cached inputs of ``blocks``
    would not reproduce the whole-model passes (see the module docstring; None where they would)."""
    seen = _Survey(blocks, layers)
    handles = [
        layer.register_forward_pre_hook(lambda m, a, n=name: seen.layer_runs(n)) for name, layer in layers.items()
    ]
    for k, module in enumerate(blocks.modules if blocks is not None else []):
        handles.append(module.register_forward_pre_hook(lambda m, a, kw, k=k: seen.before(k, a, kw), with_kwargs=True))
        handles.append(
            module.register_forward_hook(lambda m, a, kw, out, k=k: seen.after(k, m, a, kw, out), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if blocks is None:
        return seen.order, seen.calls, None
    if seen.runs != [1] * len(seen.runs):
        seen.fail(f"blocks {[k for k, r in enumerate(seen.runs) if r != 1]} do not run once per forward")
    inside = [i for i, n in enumerate(seen.order) if blocks.index(n) is not None]
    if inside and inside != list(range(inside[0], inside[0] + len(inside))):
        seen.fail("other calibrated layers run between its blocks' layers")
    return seen.order, seen.calls, None if seen.why is None else f"{blocks.name}: {seen.why}"


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """``model.config.use_cache`` off while calibrating (Hugging Face models): a key/value cache
    only keeps the keys and values for later tokens, so a fresh forward's outputs are the same
    without it, and a cache passed from block to block is state a cached block input cannot
    replay (llm-compressor turns it off while calibrating, too)."""
    config: Any = getattr(model, "config", None)
    was = getattr(config, "use_cache", None)
    if was is True:
        config.use_cache = False
    try:
        yield
    finally:
        if was is True:
            config.use_cache = True


class BlockInputs:
    """One block's inputs, per calibration batch."""

    def __init__(self, inputs: list[Inputs]) -> None:
        self.inputs = inputs

    @classmethod
    def capture(cls, model: nn.Module, block: nn.Module, batches: Sequence[Any]) -> BlockInputs | None:
        """``block``'s inputs on each batch, each pass ended there; None where a batch never reaches it."""
        inputs: list[Inputs] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs.append((args, kwargs))
            raise StopPass

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    with contextlib.suppress(StopPass):
                        call_model(model, batch)
        finally:
            handle.remove()
        return cls(inputs) if len(inputs) == len(batches) else None

    def runner(self, block: nn.Module) -> Callable[[int], None]:
        """Runs ``block`` on batch ``i``'s inputs (a hook may end it early)."""

        def run_one(i: int) -> None:
            args, kwargs = self.inputs[i]
            with torch.no_grad(), contextlib.suppress(StopPass):
                block(*args, **kwargs)

        return run_one

    def advance(self, block: nn.Module) -> None:
        """Replace each batch's inputs by the next block's: ``block``'s outputs on them."""
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(self.inputs):
                following = next_inputs(block(*args, **kwargs), args, kwargs)
                if following is None:
                    raise RuntimeError("a block returned no tensor first on a later calibration batch")
                self.inputs[i] = following


class BlockCursor:
    """The cached inputs of the block whose layers are being calibrated, moved forward block by
    block as the layers are compressed in the order they run."""

    def __init__(self, model: nn.Module, blocks: Blocks | None, batches: Sequence[Any]) -> None:
        self.model, self.blocks, self.batches = model, blocks, batches
        self.inputs: BlockInputs | None = None
        self.at = -1

    def runner(self, layer: str) -> Callable[[int], None] | None:
        """What runs batch ``i`` for ``layer``'s statistics: its block on the cached inputs, or None
        (the whole model) for a layer outside the blocks."""
        k = self.blocks.index(layer) if self.blocks is not None else None
        if k is None or self.blocks is None:
            self.inputs = None  # the blocks' layers run contiguously (find_blocks): none is left
            return None
        if self.inputs is None:
            if self.at >= 0:
                return None  # a batch never reached the blocks: whole-model passes from here on
            self.inputs, self.at = BlockInputs.capture(self.model, self.blocks.modules[k], self.batches), k
            if self.inputs is None:
                return None
        while self.at < k:
            self.inputs.advance(self.blocks.modules[self.at])
            self.at += 1
        return self.inputs.runner(self.blocks.modules[k])
