"""A model's module tree as data (``architecture.json`` in a ``.tfz``), and the tree rebuilt from it.

Only classes whose ``forward`` is torch's (or tightfit's) own code are written: an allow-list of
``torch.nn`` layers, rebuilt from constructor arguments read back from their attributes, and the
containers ``Sequential``/``ModuleList``/``ModuleDict`` (and tightfit's ``Factorized``), rebuilt
from their children, and attention/transformer layers (and tightfit's ``SplitQKVAttention``), built
from their arguments with their parts then replaced by the stored ones. Nothing in the file names code to import: a ``type`` is a key of the
allow-list. A user's class cannot be rebuilt from data (its ``forward`` is code), so a tree holding
one is not written, and loading then needs the model itself (``tightfit.load(path, model=...)``).

Each layer's recovered arguments are checked when saving: the layer is rebuilt from them (on the
``meta`` device, no memory) and must have the same submodules, tensor names, shapes and settings;
a layer that differs (an attribute edited after construction, a hook, an instance ``forward``) makes
the tree not expressible rather than rebuilt wrong.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..errors import ArtifactError
from ..operators.heads import SplitQKVAttention
from ..operators.lowrank import Factorized

ARCHITECTURE_FORMAT = "tightfit-architecture"
#: Bounds on a file's tree, so that a hostile one cannot make the loader build without end.
MAX_DEPTH = 64
MAX_NODES = 100_000

_LEAF_NAMES = (
    # matrix layers, embeddings, normalization
    "Linear",
    "Bilinear",
    "Identity",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "EmbeddingBag",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LocalResponseNorm",
    # recurrent layers
    "RNN",
    "LSTM",
    "GRU",
    # activations
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "PReLU",
    "RReLU",
    "ELU",
    "CELU",
    "SELU",
    "GELU",
    "SiLU",
    "Mish",
    "Tanh",
    "Sigmoid",
    "Hardtanh",
    "Hardswish",
    "Hardsigmoid",
    "Hardshrink",
    "Softshrink",
    "Tanhshrink",
    "Softsign",
    "Softplus",
    "LogSigmoid",
    "Threshold",
    "GLU",
    "Softmax",
    "LogSoftmax",
    "Softmin",
    "Softmax2d",
    # shape, dropout, pooling, padding, resampling
    "Flatten",
    "Unflatten",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
    "ZeroPad1d",
    "ZeroPad2d",
    "ZeroPad3d",
    "ConstantPad1d",
    "ConstantPad2d",
    "ConstantPad3d",
    "ReflectionPad1d",
    "ReflectionPad2d",
    "ReflectionPad3d",
    "ReplicationPad1d",
    "ReplicationPad2d",
    "ReplicationPad3d",
    "Upsample",
    "UpsamplingNearest2d",
    "UpsamplingBilinear2d",
    "PixelShuffle",
    "PixelUnshuffle",
    "ChannelShuffle",
    "CosineSimilarity",
    "PairwiseDistance",
)
LEAVES: dict[str, type[nn.Module]] = {name: getattr(nn, name) for name in _LEAF_NAMES if hasattr(nn, name)}
LEAVES["NonDynamicallyQuantizableLinear"] = NonDynamicallyQuantizableLinear  # attention's out_proj: a Linear
CONTAINERS: dict[str, type[nn.Module]] = {
    "Sequential": nn.Sequential,
    "ModuleList": nn.ModuleList,
    "ModuleDict": nn.ModuleDict,
    "tightfit.Factorized": Factorized,
}
#: Layers built from arguments whose submodules are then replaced by the file's own (compression
#: may have changed them: a pruned Linear, a low-rank pair, attention with fewer heads); their own
#: settings are checked like a leaf's. ``_STATE``: settings they keep beyond their arguments.
COMPOSITES: dict[str, type[nn.Module]] = {
    "MultiheadAttention": nn.MultiheadAttention,
    "TransformerEncoderLayer": nn.TransformerEncoderLayer,
    "TransformerDecoderLayer": nn.TransformerDecoderLayer,
    "TransformerEncoder": nn.TransformerEncoder,
    "tightfit.SplitQKVAttention": SplitQKVAttention,
}
_STATE = {
    "TransformerEncoder": ("use_nested_tensor",),
    "tightfit.SplitQKVAttention": ("kept_heads", "original_num_heads"),
}
_NAME_OF = {cls: name for name, cls in {**LEAVES, **CONTAINERS, **COMPOSITES}.items()}

# Recurrent layers take ``*args, **kwargs``; these are RNNBase's arguments (and RNN's nonlinearity).
_RNN_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_SPECIAL_ARGS: dict[str, dict[str, Any]] = {
    "MultiheadAttention": {
        "bias": lambda m: m.in_proj_bias is not None,
        "add_bias_kv": lambda m: m.bias_k is not None,
    },
}


class NotExpressible(Exception):
    """The tree holds a module that cannot be rebuilt from data; the message says which and why."""


# ---------------------------------------------------------------------------------------------- write


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON-able description of ``model``'s tree; raises :class:`NotExpressible` with the
    first module that cannot be described."""
    return {"format": ARCHITECTURE_FORMAT, "root": _describe(model, "")}


def _describe(module: nn.Module, path: str) -> dict[str, Any]:
    where = path or "the model"
    name = _NAME_OF.get(type(module))
    if name is None:
        raise NotExpressible(
            f"{where} is a {type(module).__module__}.{type(module).__qualname__}, a class whose forward is "
            "code (only torch.nn layers and containers are stored as data)"
        )
    if _has_own_behaviour(module):
        raise NotExpressible(f"{where} ({name}) has hooks or an instance-level forward")
    if name in CONTAINERS:
        if module._parameters or module._buffers:
            raise NotExpressible(f"{where} ({name}) holds tensors of its own")
        children = [
            [key, _describe(child, f"{path}.{key}" if path else key)]
            for key, child in module._modules.items()
            if child is not None
        ]
        if len(children) != len(module._modules):
            raise NotExpressible(f"{where} ({name}) has an empty (None) child")
        return {"type": name, "children": children}
    if name in COMPOSITES:
        return _describe_composite(module, name, path)
    args = _recover_args(module, name)
    args = _from_json_args(json.loads(json.dumps(args)))  # exactly what the loader will see
    try:
        with torch.device("meta"):
            rebuilt = LEAVES[name](**args)
    except Exception as exc:
        raise NotExpressible(f"{where} ({name}) cannot be rebuilt from {args}: {exc}") from exc
    difference = _difference(module, rebuilt)
    if difference:
        raise NotExpressible(f"{where} ({name}) is not what its constructor arguments build: {difference}")
    return {"type": name, "args": args}


def _describe_composite(module: nn.Module, name: str, path: str) -> dict[str, Any]:
    where = path or "the model"
    children = [
        [key, None if child is None else _describe(child, f"{path}.{key}" if path else key)]
        for key, child in module._modules.items()
    ]
    node: dict[str, Any] = {"type": name, "args": _composite_args(module, name, where), "children": children}
    state = {key: getattr(module, key) for key in _STATE.get(name, ()) if hasattr(module, key)}
    if not all(_is_simple(v) for v in state.values()):
        raise NotExpressible(f"{where} ({name}) keeps settings that are not plain data")
    if state:
        node["state"] = state
    try:  # the loader's own path, so what is checked is what will be loaded
        with torch.device("meta"):
            rebuilt = _build(json.loads(json.dumps(node)), where, 0, [0], max_tensors=10**9)
    except ArtifactError as exc:
        raise NotExpressible(f"{where} ({name}) cannot be rebuilt: {exc}") from exc
    difference = _difference(module, rebuilt)
    if difference:
        raise NotExpressible(f"{where} ({name}) is not what its arguments and parts build: {difference}")
    return node


def _composite_args(module: nn.Module, name: str, where: str) -> dict[str, Any]:
    if name == "TransformerEncoder":  # its layers and norm are its stored parts
        return {k: v for k, v in _recover_args(module, name).items() if k != "norm"}
    if name not in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        return _recover_args(module, name)
    names: dict[Any, str] = {F.relu: "relu", F.gelu: "gelu"}
    activation = names.get(getattr(module, "activation", None))
    if activation is None:
        raise NotExpressible(f"{where} ({name}) has an activation other than relu or gelu")
    # the submodules (attention, feed-forward, norms) are replaced by the stored ones: the arguments
    # only need to make the same own settings (d_model for shapes that are replaced, one head)
    layer = cast(nn.TransformerEncoderLayer, module)  # or a decoder layer: the same two attributes
    return {
        "d_model": int(layer.norm1.normalized_shape[0]),
        "nhead": 1,
        "dim_feedforward": 1,
        "activation": activation,
        "norm_first": bool(layer.norm_first),
    }


def _has_own_behaviour(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return "forward" in vars(module) or any(getattr(module, h, None) for h in hooks)


def _signature_args(cls: type[nn.Module], name: str) -> list[str]:
    if issubclass(cls, nn.RNNBase):
        return list(_RNN_ARGS) + {nn.RNN: ["nonlinearity"], nn.LSTM: ["proj_size"]}.get(cls, [])
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.name not in ("self", "device", "dtype")
        and not p.name.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _recover_args(module: nn.Module, name: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    special = _SPECIAL_ARGS.get(name, {})
    for arg in _signature_args(type(module), name):
        if arg in special:
            args[arg] = special[arg](module)
            continue
        if not hasattr(module, arg):
            continue  # e.g. PReLU's `init`: only initial values, which the payload replaces
        value = getattr(module, arg)
        if arg == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if _is_simple(value):
            args[arg] = value
    return args


def _is_simple(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)) and depth == 0:
        return all(_is_simple(v, 1) for v in value)
    return False


def _from_json_args(args: dict[str, Any]) -> dict[str, Any]:
    """JSON has lists; torch layers keep tuples (``kernel_size=(3, 3)``)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in args.items()}


def _difference(original: nn.Module, rebuilt: nn.Module) -> str | None:
    """How ``rebuilt`` differs from ``original`` in structure or settings (not values), or None."""
    mods_a, mods_b = dict(original.named_modules()), dict(rebuilt.named_modules())
    if list(mods_a) != list(mods_b):
        return f"submodules {sorted(mods_a)} vs {sorted(mods_b)}"
    for key, a in mods_a.items():
        b = mods_b[key]
        where = key or "the layer"
        if type(a) is not type(b) or (key and _has_own_behaviour(a)):
            return f"{where} is {type(a).__name__}"
        for slot in ("_parameters", "_buffers"):
            ta, tb = getattr(a, slot), getattr(b, slot)
            if set(ta) != set(tb):  # (baking re-adds a parametrized tensor last: order may differ)
                return f"{where} holds {sorted(ta)}, rebuilt {sorted(tb)}"
            for tname, tensor in ta.items():
                other = tb[tname]
                if (tensor is None) != (other is None) or (tensor is not None and tensor.shape != other.shape):
                    return f"{where}.{tname} has another shape"
        if a._non_persistent_buffers_set != b._non_persistent_buffers_set:
            return f"{where} has other non-persistent buffers"
        for attr, value in vars(b).items():
            if attr.startswith("_") or attr == "training" or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            try:
                same = attr in vars(a) and bool(vars(a)[attr] == value)
            except Exception:  # e.g. a tensor compared with a list
                same = False
            if not same:
                return f"{where}.{attr} is {vars(a).get(attr)!r}, rebuilt {value!r}"
    return None


# ----------------------------------------------------------------------------------------------- read


def build(spec: Any, *, max_tensors: int) -> nn.Module:
    """The module tree ``spec`` describes, its tensors on the ``meta`` device (no memory) for the
    payload to fill. ``max_tensors`` (the file's tensor count) bounds layers whose argument sets
    how many tensors they make (a recurrent layer's ``num_layers``). Raises ArtifactError naming
    the node at fault."""
    if not isinstance(spec, dict) or spec.get("format") != ARCHITECTURE_FORMAT or "root" not in spec:
        raise ArtifactError(f"architecture.json: not a tightfit architecture (format {_get(spec, 'format')!r}).")
    counter = [0]
    with torch.device("meta"):
        return _build(spec["root"], "root", 0, counter, max_tensors)


def _get(spec: Any, key: str) -> Any:
    return spec.get(key) if isinstance(spec, dict) else None


def _build(node: Any, where: str, depth: int, counter: list[int], max_tensors: int) -> nn.Module:
    counter[0] += 1
    if depth > MAX_DEPTH or counter[0] > MAX_NODES:
        raise ArtifactError(
            f"architecture.json: the tree is deeper than {MAX_DEPTH} or larger than {MAX_NODES} modules."
        )
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise ArtifactError(f"architecture.json: {where} is not a module description (needs a string 'type').")
    name = node["type"]
    if name in CONTAINERS:
        children = node.get("children")
        if not isinstance(children, list):
            raise ArtifactError(f"architecture.json: {where}.children must be a list of [name, module] pairs.")
        container = CONTAINERS[name]()
        for item in children:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not item[0]
                or "." in item[0]
                or item[0] in container._modules
            ):
                raise ArtifactError(
                    f"architecture.json: {where}.children holds {str(item)[:80]!r}, not a [unique name, module] pair."
                )
            child = _build(item[1], f"{where}.{item[0]}", depth + 1, counter, max_tensors)
            container.add_module(item[0], child)
        return container
    if name in COMPOSITES:
        return _build_composite(node, name, where, depth, counter, max_tensors)
    if name not in LEAVES:
        raise ArtifactError(
            f"architecture.json: {where} has type {name[:80]!r}, which is not an allowed torch.nn class."
        )
    return _build_leaf(name, node.get("args"), where, max_tensors)


def _build_composite(
    node: dict[str, Any], name: str, where: str, depth: int, counter: list[int], max_tensors: int
) -> nn.Module:
    children = node.get("children")
    if not isinstance(children, list) or not all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children
    ):
        raise ArtifactError(f"architecture.json: {where}.children must be a list of [name, module or null] pairs.")
    parts = {
        key: None if child is None else _build(child, f"{where}.{key}", depth + 1, counter, max_tensors)
        for key, child in children
    }
    args = node.get("args")
    if name == "TransformerEncoder":  # its constructor copies a layer num_layers times: the stored layers
        layers = parts.get("layers")
        if (
            not isinstance(layers, nn.ModuleList)
            or not len(layers)
            or not isinstance(args, dict)
            or args.get("num_layers") != len(layers)
        ):
            raise ArtifactError(f"architecture.json: {where} needs its layers, as many as its args.num_layers.")
        if any(
            k not in ("num_layers", "enable_nested_tensor", "mask_check") or type(v) not in (int, bool)
            for k, v in args.items()
        ):
            raise ArtifactError(
                f"architecture.json: {where}.args may hold num_layers, enable_nested_tensor, mask_check only."
            )
        args = {**args, "encoder_layer": layers[0], "norm": parts.get("norm")}
        built = _construct(nn.TransformerEncoder, name, args, where)
    else:
        built = _build_leaf(name, args, where, max_tensors, COMPOSITES)
    if set(parts) != set(built._modules) or len(parts) != len(children):
        raise ArtifactError(
            f"architecture.json: {where}.children are {sorted(parts)[:8]}, but a {name} has {sorted(built._modules)}."
        )
    for key, part in parts.items():
        built._modules[key] = part
    state = node.get("state", {})
    allowed = _STATE.get(name, ())
    if not isinstance(state, dict) or any(k not in allowed or not _is_simple(v) for k, v in state.items()):
        raise ArtifactError(f"architecture.json: {where}.state may only hold {list(allowed)}, as plain values.")
    for key, value in state.items():
        setattr(built, key, value)
    if isinstance(built, SplitQKVAttention) and not _heads_fit(built):
        raise ArtifactError(f"architecture.json: {where}.state.kept_heads does not fit its {built.num_heads} heads.")
    return built


def _heads_fit(attention: SplitQKVAttention) -> bool:
    kept, total = attention.kept_heads, attention.original_num_heads
    return (
        isinstance(kept, list)
        and type(total) is int
        and len(kept) == attention.num_heads
        and all(type(h) is int and 0 <= h < total for h in kept)
    )


def _build_leaf(
    name: str, args: Any, where: str, max_tensors: int, classes: dict[str, type[nn.Module]] = LEAVES
) -> nn.Module:
    cls = classes[name]
    allowed = set(_signature_args(cls, name))
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ArtifactError(f"architecture.json: {where}.args must be an object of constructor arguments.")
    for key, value in args.items():
        if key not in allowed:
            raise ArtifactError(f"architecture.json: {where}.args.{key[:40]} is not an argument of {name}.")
        if not _is_simple(value):
            raise ArtifactError(
                f"architecture.json: {where}.args.{key} must be a number, string, bool, null or list of those."
            )
    if issubclass(cls, nn.RNNBase):
        layers = args.get("num_layers", 1)
        if not isinstance(layers, int) or not 0 < layers * (2 if args.get("bidirectional") else 1) <= max_tensors:
            raise ArtifactError(
                f"architecture.json: {where}.args.num_layers={layers!r} does not fit the file's {max_tensors} tensors."
            )
    return _construct(cls, name, _from_json_args(args), where)


def _construct(cls: type[nn.Module], name: str, args: dict[str, Any], where: str) -> nn.Module:
    try:
        with warnings.catch_warnings():  # e.g. TransformerEncoder on why it takes no nested-tensor path
            warnings.simplefilter("ignore")
            return cls(**args)
    except Exception as exc:
        raise ArtifactError(
            f"architecture.json: {where} ({name}) cannot be built from its args: {type(exc).__name__}: {exc}"
        ) from exc
