"""Structured pruning: whole output channels / filters / neurons removed, so layers get smaller.

Channels that must go together — a residual addition's branches, the BatchNorm after a conv, a
concatenation's parts, a depthwise conv, the next layer's input channels — form one *group*,
found by Torch-Pruning's dependency graph. The search sets one ratio per group, recorded in the
plan on the group's first layer (its *leader*). Which channels go is decided by the group's L2
weight magnitude, so the plan replays exactly on a copy of the same weights; on a fresh instance
(``tightfit.load(path, model=...)``) it reproduces the same shapes, and the file supplies the values.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..calling import call_model, model_arguments, output_tensors
from ..errors import ConfigError, ModelError
from ..measure.analysis import RECURRENT_KINDS, LayerInfo, tied_groups
from .base import Hyperparameter, Operator, parse_range
from .group_search import failing_members
from .heads import prunable_head_blocks, remove_heads

log = logging.getLogger("tightfit")


# -- the example input, as JSON-ready data (a plan must replay without the user's tensors) ---------


def input_spec(example_input: Any) -> Any:
    """Shapes and dtypes of an example input (tensor, tuple/list of them, or dict of kwargs)."""
    if isinstance(example_input, torch.Tensor):
        return {"shape": list(example_input.shape), "dtype": str(example_input.dtype).removeprefix("torch.")}
    if isinstance(example_input, Mapping):
        return {"kwargs": {k: input_spec(v) for k, v in example_input.items()}}
    if isinstance(example_input, (tuple, list)):
        return {"args": [input_spec(v) for v in example_input]}
    if example_input is None or isinstance(example_input, (bool, int, float, str)):
        return {"value": example_input}
    raise ConfigError(
        f"StructuredPrune: the example input holds a {type(example_input).__name__}; give tensors, "
        "tuples/lists of tensors or a dict of them."
    )


def input_from_spec(spec: Any) -> Any:
    """A stand-in input with the recorded shapes (zeros: tracing needs shapes, not values)."""
    if "shape" in spec:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
    if "kwargs" in spec:
        return {k: input_from_spec(v) for k, v in spec["kwargs"].items()}
    if "args" in spec:
        return tuple(input_from_spec(v) for v in spec["args"])
    return spec["value"]


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """How many of ``channels`` a group keeps at pruning ``ratio``, rounded to a multiple of
    ``round_to`` when given (never below one multiple, never above ``channels``)."""
    kept = channels - int(math.floor(ratio * channels + 1e-9))
    if round_to:
        kept = max(round_to, int(round(kept / round_to)) * round_to)
    return min(channels, max(1, kept))


# -- the dependency graph ---------------------------------------------------------------------------


def torch_pruning_module():
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError("StructuredPrune needs Torch-Pruning: pip install 'tightfit[speed]'.") from None
    return torch_pruning


def dependency_graph(model: nn.Module, example_input: Any):
    tp = torch_pruning_module()

    args, kwargs = model_arguments(model, example_input)  # Torch-Pruning calls model(**dict) or model(*tuple)
    if kwargs:
        args = kwargs
    was_training = model.training
    # the graph is read from autograd: a frozen layer's output has no history, so it would look
    # disconnected. Every parameter takes part while tracing, and is frozen again afterwards.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    # Torch-Pruning removes its recording hooks only after a forward pass that ended well; one cut
    # short (a time limit, a failing layer) would leave them recording every later forward pass
    hooks = {module: set(module._forward_hooks) for module in model.modules()}
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=args, verbose=False, output_transform=_traced_tensors
            )
    finally:
        model.train(was_training)
        for param in frozen:
            param.requires_grad_(False)
        for module, before in hooks.items():
            for key in set(module._forward_hooks) - before:
                for table in (
                    module._forward_hooks,
                    module._forward_hooks_with_kwargs,
                    module._forward_hooks_always_called,
                ):
                    table.pop(key, None)


class TraceTimeout(Exception):
    """Finding the channel groups took longer than ``StructuredPrune(trace_timeout=...)``."""


#: After the limit, the timeout is raised again at this interval until the block ends: a bare
#: ``except:`` in the traced code (Torch-Pruning has one around the forward pass) may swallow one.
_REPEAT_S = 0.5


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TraceTimeout` in this block after ``seconds``, in whichever thread runs it.
    Torch-Pruning's grouping never ends on some attention blocks (grouped-query attention in
    Llama-style models: its issue #527, an ever-growing Python loop), and a search must not hang on it.

    A watchdog thread raises the timeout *in the thread running the block*
    (``PyThreadState_SetAsyncExc``), so the endless loop itself stops and unwinds through its
    ``finally`` blocks. The alternatives are worse: SIGALRM reaches only the main thread (a notebook
    running compress in a thread, or a worker thread, ran unlimited); tracing in a helper thread and
    waiting with a timeout cannot stop that thread, which would go on looping (holding the GIL,
    growing memory) on the model the search is using; checking the clock cooperatively cannot reach
    a loop inside Torch-Pruning. Limitation: like a signal, the exception arrives between Python
    bytecodes, so a single native call that never returns is not cut short.
    """
    if not seconds:
        yield
        return

    message = f"no answer within {seconds:g} s"
    # the interpreter makes the exception from its class, without arguments: the message is built in
    expired = type("TraceTimeout", (TraceTimeout,), {"__init__": lambda self: TraceTimeout.__init__(self, message)})
    target = threading.get_ident()
    done = threading.Event()
    lock = threading.Lock()  # once the block has ended (done is set under it), nothing is injected

    def watch() -> None:
        wait = seconds
        while not done.wait(wait):
            with lock:
                if done.is_set():
                    return
                _raise_in_thread(target, expired)
            wait = _REPEAT_S

    threading.Thread(target=watch, name="tightfit-trace-timeout", daemon=True).start()
    try:
        yield
    finally:
        # the watchdog must be stopped even if a timeout it sent arrives here, in this finally:
        # otherwise it would go on raising timeouts in whatever this thread does next
        while True:
            try:
                with lock:
                    done.set()
                    _raise_in_thread(target, None)  # one sent but not raised yet must not surface after the block
                break
            except TraceTimeout:
                continue


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise ``exception`` in the thread ``thread_id`` at its next bytecode (None cancels one pending)."""
    import ctypes

    # None must reach C as NULL (clear), not as the object None
    pending = None if exception is None else ctypes.py_object(exception)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), pending)


def _traced_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor with a history in a model's output (:func:`output_tensors`: nested dicts, tuples,
    lists; Hugging Face models return dict-like outputs of tuples, with None for what was not asked for)."""
    return [t for t in output_tensors(output) if t.grad_fn is not None]


def _terminal_layers(dg) -> list[nn.Module]:
    """Conv/Linear layers whose output channels reach the model's output without passing through
    another layer that absorbs channels: pruning them would change the output's shape."""
    tp = torch_pruning_module()

    absorbing = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
    terminal = []
    for module, node in dg.module2node.items():
        if not isinstance(module, absorbing):
            continue
        stack, seen, reaches_output = list(node.outputs), set(), not node.outputs
        while stack and not reaches_output:
            nxt = stack.pop()
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            m = nxt.module
            depthwise = isinstance(m, tp.ops.TORCH_CONV) and m.groups > 1 and m.groups == m.in_channels
            if isinstance(m, absorbing) and not depthwise:
                continue
            if not nxt.outputs:
                reaches_output = True
            stack.extend(nxt.outputs)
        if reaches_output:
            terminal.append(module)
    return terminal


#: Channel groups touching these modules are left alone: Torch-Pruning cuts their embedding width
#: without keeping it divisible by the number of heads, or their hidden size across the gates.
#: (Attention loses whole heads instead: see :mod:`.heads`.)
_LEFT_ALONE = (nn.MultiheadAttention, nn.RNNBase)


def coupled_groups(
    model: nn.Module, example_input: Any, skip: list[nn.Module] | None = None
) -> tuple[dict[str, list[str]], Any]:
    """Channel groups of ``model`` (leader layer name -> names of every layer the group touches) and
    the dependency graph they were found in.

    Layers whose output is the model's output are left out (their channels are the answer).
    """
    tp = torch_pruning_module()

    dg = dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    groups: dict[str, list[str]] = {}
    ignored = _terminal_layers(dg) + list(skip or [])
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
        members = []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Module) and module in names and names[module] not in members:
                members.append(names[module])
        if any(isinstance(m, _LEFT_ALONE) for m, n in names.items() if n in members):
            continue  # attention heads / recurrent gates need whole-head or whole-gate pruning
        leader = names[group[0].dep.target.module]
        groups[leader] = members
    return groups, dg


BREAKS_FORWARD = (
    "removing its channels breaks the model's forward pass (e.g. attention heads reshaped from them, "
    "or a flattened feature map joined to other features); "
    "left alone by structured pruning"
)


def _is_grouped_conv(module: nn.Module) -> bool:
    """A convolution whose channels split into several groups, other than a depthwise one (one
    channel per group on both sides, which Torch-Pruning prunes channel by channel, in and out together)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and not module.groups == module.in_channels == module.out_channels
    )


def _channel_period(
    dg, leader: nn.Module, channels: int, names: Mapping[nn.Module, str]
) -> tuple[int | None, str | None]:
    """How a group's channels must be removed when grouped convolutions take them: ``(period,
    None)``, the group's channels split into ``period`` equal blocks and the same positions removed
    from every block, so that each group of those convolutions keeps as many channels as the others
    and its weights still line up; ``(None, None)`` when no grouped convolution takes them; ``(None,
    why)`` when Torch-Pruning cannot prune them correctly.

    Torch-Pruning 1.6's dependency graph does not keep a grouped convolution's groups equal: its
    ConvPruner removes a grouped convolution's input channels by keeping the first ``kept / groups``
    columns of its weight, which is right only when every group lost the same positions (its
    high-level pruners arrange that; a pruning group built by hand, as here, must), and removes its
    output channels wherever they are, so the groups must also lose as many each.
    """
    pruner = dg.get_pruner_of_module(leader)
    period = 1
    for item in dg.get_pruning_group(leader, pruner.prune_out_channels, list(range(channels))):
        module = item.dep.target.module
        if not _is_grouped_conv(module):
            continue
        name = f"{names.get(module, type(module).__name__)}: groups={module.groups}"
        side = "output" if dg.is_out_channel_pruning_fn(item.dep.handler) else "input"
        width = module.out_channels if side == "output" else module.in_channels
        if module.transposed:
            return None, (
                f"a grouped transposed convolution takes its channels ({name}): Torch-Pruning 1.6 removes "
                "its channels from the wrong weight dimension"
            )
        if module.groups == module.out_channels:
            return None, (
                f"a grouped convolution with one output channel per group takes its channels ({name}): "
                "Torch-Pruning 1.6 prunes it as a depthwise one, input and output channels together, "
                "which breaks its groups"
            )
        identity = list(range(channels))
        if width != channels or list(item.idxs) != identity or list(getattr(item, "root_idxs", None) or []) != identity:
            return None, (
                f"a grouped convolution takes only part of its {side} channels from this group, or in "
                f"another order ({name}; e.g. through a concatenation): its groups cannot be kept equal"
            )
        if width == module.groups:
            return None, (
                f"a grouped convolution has one {side} channel per group ({name}): removing any "
                "would remove a whole group"
            )
        period = math.lcm(period, module.groups)
    return (period if period > 1 else None), None


def grouped_conv_obstacles(model: nn.Module, dg, groups: Mapping[str, list[str]]) -> dict[str, str]:
    """Leaders of the groups whose channels grouped convolutions take in a way that cannot be
    pruned correctly (:func:`_channel_period`) -> why, in a user's terms."""
    modules, names = dict(model.named_modules()), {m: n for n, m in model.named_modules()}
    found = {}
    for name in groups:
        leader = modules[name]
        _, why = _channel_period(dg, leader, dg.get_pruner_of_module(leader).get_out_channels(leader), names)
        if why:
            found[name] = f"{why}; left alone by structured pruning"
    return found


def _has_grouped_conv(model: nn.Module, members: list[str]) -> bool:
    modules = dict(model.named_modules())
    return any(_is_grouped_conv(modules[m]) for m in members if m in modules)


def _tied_obstacles(model: nn.Module, groups: Mapping[str, list[str]]) -> dict[str, str]:
    """Groups that would remove channels of a tied weight (a head sharing its embedding's weight):
    the modules sharing it read the whole tensor, so they would be untied. Leader -> reason."""
    sharing: dict[str, list[str]] = {}
    for leader, followers in tied_groups(model).items():
        group = [leader, *followers]
        sharing.update({name: [other for other in group if other != name] for name in group})
    obstacles = {}
    for leader, members in groups.items():
        tied = [member for member in members if member in sharing]
        if tied:
            obstacles[leader] = (
                f"removing its channels would change the shape of {tied[0]}'s weight, which "
                f"{', '.join(sharing[tied[0]])} share(s) (tied weights)"
            )
    return obstacles


UNLIKE_ZEROING = (
    "removing its channels (the same positions from every group of the grouped convolution that takes "
    "them) does not compute what zeroing them does; left alone by structured pruning"
)


def breaking_groups(
    model: nn.Module, example_input: Any, leaders: list[str], ratio: float = 0.0, round_to: int | None = None
) -> list[str]:
    """The groups (by leader) whose pruning makes the model fail or change its output's shapes.

    Torch-Pruning follows channels through reshapes it understands (a flatten before a Linear) but
    not, without being told the number of heads, through an attention block's split into heads, and
    it can mislay channel indices where a flatten meets a concatenation. Rather than recognise every
    such pattern, each group is tried the way a plan prunes it, with one channel removed and at
    ``ratio`` (the top of the searched range): every group at once on a copy, then halves of the failing set, until
    the groups that break are found (one forward pass per try; only the failing halves are split further).
    """
    with torch.no_grad():
        reference = _shapes(call_model(copy.deepcopy(model).eval(), example_input))

    def clean_at(subset: list[str], at: float) -> bool:
        trial = copy.deepcopy(model)
        prune_groups(trial, {name: at for name in subset}, example_input, round_to, at_least_one=True)
        with torch.no_grad():
            return _shapes(call_model(trial.eval(), example_input)) == reference

    # one channel (a grouped conv's count breaks), and the most searched
    return failing_members(list(leaders), lambda subset: _holds_at(ratio, lambda at: clean_at(subset, at)))


def _holds_at(ratio: float, check: Callable[[float], bool]) -> bool:
    """``check`` passes when pruning at one channel (``at_least_one``, ratio 0) and at ``ratio``;
    any failure of the pruned model counts as not passing, except a trace timeout, which the
    caller handles."""
    for at in sorted({0.0, ratio}):
        try:
            if not check(at):
                return False
        except TraceTimeout:
            raise
        except Exception:
            return False
    return True


def _shapes(output: Any) -> Any:
    """The nested structure of an output with tensors replaced by their shapes."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, Mapping):
        return {k: _shapes(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return [_shapes(v) for v in output]
    return type(output).__name__


def _choose_drop(dg, full_group, scores, n_drop: int) -> list[int]:
    """The ``n_drop`` lowest-scoring channels of a group (ties: lower index first), skipping any
    whose removal would empty one coupled layer (a concatenation's part may own few channels)."""
    parts = [
        set(item.root_idxs)
        for item in full_group
        if dg.is_out_channel_pruning_fn(item.dep.handler) and getattr(item, "root_idxs", None)
    ]
    remaining = [len(p) for p in parts]
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    drop: list[int] = []
    for channel in order:
        if len(drop) == n_drop:
            break
        owners = [k for k, part in enumerate(parts) if channel in part]
        if any(remaining[k] <= 1 for k in owners):
            continue
        for k in owners:
            remaining[k] -= 1
        drop.append(channel)
    return sorted(drop)


def _choose_periodic_drop(scores, period: int, n_drop: int) -> list[int]:
    """``n_drop`` channels, the same positions from each of ``period`` equal blocks of the group's
    channels (see :func:`_channel_period`): the positions whose scores, averaged over the blocks,
    are lowest (ties: lower position first)."""
    size = len(scores) // period
    mean = torch.as_tensor(scores, dtype=torch.float64).reshape(period, size).mean(dim=0)
    positions = sorted(range(size), key=lambda i: (float(mean[i]), i))[: n_drop // period]
    return sorted(p + block * size for block in range(period) for p in positions)


def _multiple(round_to: int | None, members: list[nn.Module], period: int | None = None) -> int | None:
    """What a group's kept channel count must be a multiple of: ``round_to``, the ``period`` of
    the grouped convolutions taking its channels, and the group count of every GroupNorm among its
    layers (its channels must split evenly into its groups)."""
    norms = [m.num_groups for m in members if isinstance(m, nn.GroupNorm)]
    multiple = math.lcm(round_to or 1, period or 1, *norms)
    return multiple if multiple > 1 else None


def _periods(dg, model: nn.Module, groups: Mapping[str, list[str]], names: list[str]) -> dict[str, int | None]:
    """:func:`_channel_period` of each named group, read before any is pruned: a grouped
    convolution whose outputs are pruned to one per group would afterwards look depthwise, though
    the graph (built before) still prunes its inputs as a grouped convolution's, correctly."""
    modules = dict(model.named_modules())
    by_module = {m: n for n, m in modules.items()}
    periods = {}
    for name in names:
        if name not in groups:
            raise ConfigError(
                f"StructuredPrune: layer {name!r} leads no prunable channel group of this model "
                f"(groups are led by {sorted(groups)[:8]})."
            )
        leader = modules[name]
        periods[name], obstacle = _channel_period(
            dg, leader, dg.get_pruner_of_module(leader).get_out_channels(leader), by_module
        )
        if obstacle:
            raise ModelError(f"StructuredPrune: group {name!r}: {obstacle}.")
    return periods


def _planned_drop(
    dg,
    model: nn.Module,
    groups: Mapping[str, list[str]],
    name: str,
    ratio: float,
    round_to: int | None,
    at_least_one: bool,
    period: int | None,
) -> list[int]:
    """The output channels of group ``name`` that pruning it at ``ratio`` removes (none: ``[]``);
    ``period`` from :func:`_periods`."""
    tp = torch_pruning_module()

    modules = dict(model.named_modules())
    leader = modules[name]
    pruner = dg.get_pruner_of_module(leader)
    channels = pruner.get_out_channels(leader)
    multiple = _multiple(round_to, [modules[m] for m in groups[name] if m in modules], period)
    kept = kept_channels(channels, ratio, multiple)
    if at_least_one and channels >= 2:
        kept = min(kept, channels - 1)
        if multiple:  # the fewest channels a GroupNorm, a grouped convolution (or round_to) lets go
            kept = kept // multiple * multiple or channels
    if kept >= channels:
        return []
    group = dg.get_pruning_group(leader, pruner.prune_out_channels, list(range(channels)))
    with torch.no_grad():
        scores = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)(group)
    if scores is None or len(scores) != channels:
        raise ModelError(f"StructuredPrune: could not score the channels of group {name!r}.")
    # A GroupNorm over all of the group's channels normalizes blocks of consecutive channels: each
    # block loses as many, so every channel that stays is normalized with the same neighbours.
    norms = [
        m.num_groups
        for m in (modules[n] for n in groups[name] if n in modules)
        if isinstance(m, nn.GroupNorm) and m.num_channels == channels
    ]
    period = math.lcm(period or 1, *norms)
    if period > 1:
        return _choose_periodic_drop(scores, period, channels - kept)
    return _choose_drop(dg, group, scores, channels - kept)


def _pruning_group(dg, leader: nn.Module, drop: list[int], name: str):
    pruner = dg.get_pruner_of_module(leader)
    group = dg.get_pruning_group(leader, pruner.prune_out_channels, drop)
    if not dg.check_pruning_group(group):
        raise ConfigError(
            f"StructuredPrune: pruning {len(drop)} of {pruner.get_out_channels(leader)} channels of group {name!r} "
            "would remove every channel of a coupled layer; refused. Lower the group's ratio."
        )
    return group


def prune_groups(
    model: nn.Module, todo: dict[str, float], example: Any, round_to: int | None = None, *, at_least_one: bool = False
) -> None:
    """Remove the lowest-magnitude fraction ``todo[leader]`` of the output channels of each group, in
    place (``at_least_one``: one channel even where the ratio rounds to none, for checks)."""
    groups, dg = coupled_groups(model, example)
    modules = dict(model.named_modules())
    periods = _periods(dg, model, groups, list(todo))
    for name, ratio in todo.items():  # plan order == the order the groups were found in
        drop = _planned_drop(dg, model, groups, name, ratio, round_to, at_least_one, periods[name])
        if drop:
            _pruning_group(dg, modules[name], drop, name).prune()


def _zero_readers(dg, group) -> None:
    """Zero the weights that read a pruning group's channels: the input columns of every Conv and
    Linear taking them in (a grouped convolution's within the group each channel belongs to). The
    model then ignores those channels, which is what removing them must compute too."""
    for item in group:
        module = item.dep.target.module
        if not dg.is_in_channel_pruning_fn(item.dep.handler) or not isinstance(
            module, (nn.Linear, nn.modules.conv._ConvNd)
        ):
            continue
        idxs = list(item.idxs)
        weight = module.weight
        if isinstance(module, nn.Linear):
            weight[:, idxs] = 0
        elif module.transposed:  # (in, out / groups, ...)
            weight[idxs] = 0
        elif module.groups == module.in_channels == module.out_channels:
            continue  # depthwise: its channels go whole, and whatever reads them is in the group too
        else:  # (out, in / groups, ...): input channel c is column c % size of the rows of its group
            size_in, size_out = module.in_channels // module.groups, module.out_channels // module.groups
            for c in idxs:
                g = c // size_in
                weight[g * size_out : (g + 1) * size_out, c % size_in] = 0


def pruning_unlike_zeroing(
    model: nn.Module, example_input: Any, leaders: list[str], ratio: float = 0.0, round_to: int | None = None
) -> list[str]:
    """The groups (by leader) whose pruning does not compute what zeroing the weights that read
    their channels computes, on ``example_input``: each pruned as a plan would, with one channel
    (one position of each block, for grouped convolutions) and at ``ratio``; all at once on a copy,
    then halves of a failing set (:func:`breaking_groups`)."""
    from .heads import outputs_close

    def same_at(subset: list[str], at: float) -> bool:
        trial = copy.deepcopy(model).eval()
        groups, dg = coupled_groups(trial, example_input)
        modules = dict(trial.named_modules())
        with torch.no_grad():
            periods = _periods(dg, trial, groups, subset)
            drops = {name: _planned_drop(dg, trial, groups, name, at, round_to, True, periods[name]) for name in subset}
            for name, drop in drops.items():
                if drop:
                    _zero_readers(dg, _pruning_group(dg, modules[name], drop, name))
            zeroed = call_model(trial, example_input)
            for name, drop in drops.items():
                if drop:
                    _pruning_group(dg, modules[name], drop, name).prune()
            return outputs_close(zeroed, call_model(trial, example_input))

    return failing_members(list(leaders), lambda subset: _holds_at(ratio, lambda at: same_at(subset, at)))


class StructuredPrune(Operator):
    """Remove a fraction ``ratio`` of the output channels of each coupled group of layers, and a
    fraction ``head_ratio`` of the heads of each attention block.

    ``ratio`` is a fixed fraction or a ``(low, high)`` range searched per group (default
    ``(0.0, 0.75)``); ``head_ratio`` likewise per attention block (rounded down, one head always
    kept; ``0`` leaves attention alone). Whole heads are removed from ``nn.MultiheadAttention`` (so
    ``nn.TransformerEncoderLayer``), which becomes a :class:`~.heads.SplitQKVAttention`, and from
    Hugging Face-style attention whose head count is an attribute; a block is taken only once removing
    heads is checked to compute what zeroing them does, others are left alone and named. A block's
    ``head_ratio`` is recorded in the plan on ``<attention>.out_proj`` or on the leader of its q/k/v
    group. ``round_to`` keeps a multiple of 8 or 16 channels, which CPU kernels favour.
    ``example_input`` is what the dependency graph is traced with; ``compress`` passes its own
    when it is not given here. A ratio that would remove every channel of a group is refused.
    Other groups whose pruning breaks the forward pass (e.g. attention that fails the head check)
    are left alone and named. Channels a grouped convolution takes go at the same positions from
    each of its groups (:func:`_channel_period`), once a check on a copy shows that removing them
    computes what zeroing them does.
    ``trace_timeout`` (seconds, None for no limit) bounds finding the groups: past it, the model is
    left alone by this operator with a warning instead of hanging.
    """

    name = "structured_prune"
    structural = True

    def __init__(
        self,
        ratio: float | tuple[float, float] = (0.0, 0.75),
        *,
        head_ratio: float | tuple[float, float] = (0.0, 0.75),
        round_to: int | None = None,
        example_input: Any = None,
        input_spec: Any = None,
        trace_timeout: float | None = 60.0,
        layers: list[str] | None = None,
    ) -> None:
        super().__init__(layers=layers)
        low, high = parse_range(
            "StructuredPrune", "ratio", ratio, lambda v: 0.0 <= v < 1.0, "[0, 1) (1 would remove every channel)"
        )
        self.head_ratio = parse_range(
            "StructuredPrune", "head_ratio", head_ratio, lambda v: 0.0 <= v < 1.0, "[0, 1) (1 would remove every head)"
        )
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ConfigError(
                f"StructuredPrune: `round_to` must be a whole number >= 1 (e.g. 8 or 16), but got {round_to!r}."
            )
        self.ratio = (low, high)
        self.round_to = round_to
        self.trace_timeout = trace_timeout
        self._spec = input_spec
        if example_input is not None:
            self.bind_example_input(example_input)
        # an input given here is kept; one taken from compress is taken again on every prepare, so
        # the same operator can serve several models
        self._own_spec = self._spec is not None
        self._groups: dict[str, list[str]] | None = None
        self._heads: list[str] = []  # layers recording an attention block's head_ratio
        self._refused: dict[str, str] = {}

    def bind_example_input(self, example_input: Any) -> None:
        """Record the input the dependency graph is traced with (only its shapes and dtypes)."""
        self._spec = input_spec(example_input)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Leader layer -> coupled layers, as found by :meth:`prepare` (empty before)."""
        return dict(self._groups or {})

    def prepare(self, model: nn.Module, example_input: Any) -> None:
        if not self._own_spec and example_input is not None:
            self.bind_example_input(example_input)
        if self._spec is None:
            raise ConfigError(
                "StructuredPrune needs an example input to trace the model's channel dependencies: "
                "pass `example_input=` to compress (or to StructuredPrune)."
            )
        example = input_from_spec(self._spec)
        self._refused, self._heads, heads = {}, [], {}
        untraced = None
        try:
            with _time_limit(self.trace_timeout):
                self._groups, dg = coupled_groups(model, example)
                self._refused = grouped_conv_obstacles(model, dg, self._groups)
                self._refused.update(_tied_obstacles(model, self._groups))
                candidates = [name for name in self._groups if name not in self._refused]
                broken = breaking_groups(model, example, candidates, self.ratio[1], self.round_to)
                self._refused.update({name: BREAKS_FORWARD for name in broken})
                values = example_input if example_input is not None else example  # real values where given
                grouped = [n for n in candidates if n not in broken and _has_grouped_conv(model, self._groups[n])]
                self._refused.update(
                    {
                        name: UNLIKE_ZEROING
                        for name in pruning_unlike_zeroing(model, values, grouped, self.ratio[1], self.round_to)
                    }
                )
                if self.head_ratio[1] > 0.0:  # checked on real values too (zeros can mask every token)
                    heads = prunable_head_blocks(model, values, broken)
        except ConfigError:
            raise
        except Exception as exc:  # a model Torch-Pruning cannot trace is left alone, not a crash
            log.warning(
                "StructuredPrune: cannot trace the model's channel dependencies (%s: %s); "
                "no layer is pruned structurally.",
                type(exc).__name__,
                exc,
            )
            self._groups, self._refused, heads = {}, {}, {}
            untraced = f"structured pruning cannot trace the model's channel dependencies ({type(exc).__name__}: {exc})"
        refused_groups = {name: self._groups.pop(name) for name in self._refused}
        reasons = dict(self._refused)
        self._heads = [key for key, why in heads.items() if not why]
        kept = {member for members in self._groups.values() for member in members}
        for key in self._heads:  # a broken channel group that loses whole heads instead
            kept.update(refused_groups.pop(key, [key]))
            self._refused.pop(key, None)
        for leader, members in refused_groups.items():  # every layer of a refused group, unless another group prunes it
            for member in members:
                if member not in kept:
                    self._refused.setdefault(member, reasons.get(leader, BREAKS_FORWARD))
        for key, why in heads.items():  # attention outside any group (nn.MultiheadAttention) left whole
            if why and key not in kept:
                self._refused.setdefault(key, why)
        if untraced:  # named in the run's notes / left_alone, not only in a log line
            self._refused = {
                name: untraced
                for name, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
            }

    def refused(self) -> dict[str, str]:
        return dict(self._refused)

    def why_not_tied(self, tied: list[str]) -> str:
        return (
            f"structured_prune would change the shape of a weight shared with {', '.join(tied)} (tied weights), "
            "which read it whole; prune / quantize compress the shared weight instead"
        )

    def why_not(self, layer: LayerInfo) -> str | None:
        if layer.kind in RECURRENT_KINDS:
            return (
                "structured_prune does not remove a recurrent layer's hidden units: each one spans a row of every "
                "gate, a column of the recurrent matrices and the next layer's inputs; prune / quantize compress "
                "its weights"
            )
        if self._groups is None or layer.kind not in ("Linear", "Conv1d", "Conv2d", "Conv3d"):
            return None
        return (
            "structured_prune finds no channel group this layer leads: its outputs are the model's output, or "
            "are tied to channels that are (e.g. a residual stream the output reads)"
        )

    def follows(self) -> dict[str, list[str]]:
        leaders: dict[str, list[str]] = {}
        for leader, members in (self._groups or {}).items():
            for member in members:
                if member != leader:
                    leaders.setdefault(member, []).append(leader)
        return leaders

    def touches(self) -> list[str]:
        return [key.rpartition(".")[0] for key in self._heads if key.endswith(".out_proj")]

    @property
    def head_blocks(self) -> list[str]:
        """Layers on which an attention block's ``head_ratio`` is searched, as found by :meth:`prepare`."""
        return list(self._heads)

    def supports(self, layer: LayerInfo) -> bool:
        return self._groups is not None and (layer.name in self._groups or layer.name in self._heads)

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        if layer.name in self._heads:
            low, high = self.head_ratio
            return [Hyperparameter("head_ratio", low=low, high=high)]
        low, high = self.ratio
        return [Hyperparameter("ratio", low=low, high=high)]

    def identity(self) -> dict[str, Any]:
        return {"ratio": 0.0, "head_ratio": 0.0}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        raise ModelError("StructuredPrune works on the whole model (coupled layers); apply a plan with tightfit.apply.")

    def apply_to_model(self, model: nn.Module, settings_by_layer: dict[str, dict[str, Any]]) -> None:
        todo, heads = {}, {}
        for name, settings in settings_by_layer.items():
            for setting, into in (("ratio", todo), ("head_ratio", heads)):
                value = float(settings.get(setting, 0.0))
                if not 0.0 <= value < 1.0:
                    raise ConfigError(
                        f"StructuredPrune: layer {name!r} has {setting} {value!r}; it must lie in [0, 1) "
                        f"(1 would remove every {'channel of the group' if setting == 'ratio' else 'head'})."
                    )
                if value > 0.0:
                    into[name] = value
        if not todo and not heads:
            return
        if self._spec is None:
            raise ConfigError("StructuredPrune: no example input recorded; the plan cannot be replayed.")
        example = input_from_spec(self._spec)
        if todo:
            prune_groups(model, todo, example, self.round_to)
        if heads:  # after the channel groups, which were found on the model as it was given
            remove_heads(model, heads, example)

    def config(self) -> dict[str, Any]:
        return {
            "ratio": list(self.ratio),
            "head_ratio": list(self.head_ratio),
            "round_to": self.round_to,
            "input_spec": self._spec,
            **super().config(),
        }
