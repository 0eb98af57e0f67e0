"""What a model holds: its compressible layers, what is left alone and why, counts and FLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..calling import call_model

#: Layer types whose ``weight`` the built-in operators know how to compress. A transposed
#: convolution (a decoder's upsampling) is pruned and quantized element-wise (its scales are per
#: input channel, the weight's first dimension); low rank, int8 and structured pruning's own
#: settings are for the others.
COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: The kind of a layer that is none of COMPRESSIBLE_TYPES but holds just a 2-D ``weight`` (and at
#: most a 1-D ``bias``), such as Hugging Face's ``Conv1D`` in GPT-2 (a Linear stored transposed) or
#: a hand-written linear layer. Element-wise operators (prune, quantize) compress it; low rank
#: factorizes it and int8 runs it as an ``nn.Linear``, once it checks out as an affine map
#: (``operators.matrix.linear_equivalent``); structured pruning leaves it alone.
MATRIX_KIND = "MatrixLayer"

#: An ``nn.Embedding``'s table: rows pruned and quantized element-wise like any weight (per-row
#: scales), often the largest tensor of a language model. Not with ``sparse=True``: its sparse
#: gradients cannot pass through a parametrization.
EMBEDDING_KIND = "Embedding"

#: Recurrent layers: their weight matrices (``weight_ih_l0``, ``weight_hh_l0``, ``..._reverse``,
#: ``weight_hr_l0``; see :func:`weight_names`) are compressed element-wise, one setting for all of
#: them. The layer reads its weights through ``_flat_weights``, which its forward re-reads from the
#: attributes when they changed (torch's ``RNNBase._update_flat_weights``), so a parametrized weight
#: is what it computes with. A torch without that method leaves them alone.
RECURRENT_TYPES: tuple[type[nn.RNNBase], ...] = (
    (nn.LSTM, nn.GRU, nn.RNN) if hasattr(nn.RNNBase, "_update_flat_weights") else ()
)
RECURRENT_KINDS = frozenset(t.__name__ for t in RECURRENT_TYPES)

#: Kinds whose weight(s) the element-wise operators compress.
ELEMENTWISE_KINDS = frozenset(
    {t.__name__ for t in COMPRESSIBLE_TYPES} | {MATRIX_KIND, EMBEDDING_KIND} | RECURRENT_KINDS
)


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a compressible layer (``"Linear"`` for a subclass of nn.Linear, ...), or None."""
    for layer_type in COMPRESSIBLE_TYPES:
        if isinstance(module, layer_type):
            return layer_type.__name__
    if isinstance(module, nn.Embedding):
        return None if module.sparse else EMBEDDING_KIND
    for layer_type in RECURRENT_TYPES:
        if isinstance(module, layer_type):
            return layer_type.__name__
    return MATRIX_KIND if _is_matrix_layer(module) else None


def weight_names(module: nn.Module) -> list[str]:
    """The tensors of a layer that operators compress: ``["weight"]``, or a recurrent layer's
    weight matrices in its own order (biases stay float, as every layer's do)."""
    if isinstance(module, RECURRENT_TYPES):
        return [name for name in module._flat_weights_names if name.startswith("weight_")]
    return ["weight"]


def layer_weights(module: nn.Module) -> list[torch.Tensor]:
    """The (effective, i.e. compressed when parametrized) tensors named by :func:`weight_names`."""
    return [getattr(module, name) for name in weight_names(module)]


def _is_matrix_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):  # a lookup table, not a product
        return False
    if any(name != "parametrizations" for name, _ in module.named_children()):
        return False
    own: dict[str, Any] = {k: p for k, p in module._parameters.items() if p is not None}
    if parametrize.is_parametrized(module):  # compressed already: its weight lives in the parametrization
        # parametrize's ModuleDict and ParametrizationList: Module.__getattr__ says Tensor | Module
        own.update({k: chain.original for k, chain in cast(nn.ModuleDict, module.parametrizations).items()})
    weight, bias = own.get("weight"), own.get("bias")
    if weight is None or weight.dim() != 2 or set(own) - {"weight", "bias"}:
        return False
    return bias is None or (bias.dim() == 1 and bias.numel() in weight.shape)


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer, as plain data (the module itself is looked up by ``name``)."""

    name: str
    type: str  # the module's own class name
    kind: str  # the built-in layer type it is, e.g. "Linear" for a subclass of nn.Linear
    weight_shape: tuple[int, ...]  # a recurrent layer's: its first matrix's (weight_ih_l0)
    params: int  # weight + bias
    weight_params: int  # all of a recurrent layer's weight matrices
    #: Other modules whose weight is this very Parameter (tied weights, e.g. a language model's output
    #: head and its input embedding). This layer leads them: its plan entry compresses the one
    #: tensor, and every module of the group computes with the result (see :func:`tied_groups`).
    tied: tuple[str, ...] = ()


#: How the model's top-level module is shown where a name is expected: its dotted path is empty.
ROOT_NAME = "<root>"


@dataclass(frozen=True)
class SkippedModule:
    """A module that holds parameters tightfit leaves alone, and why.

    ``name`` is the module's dotted path, except for a parameter the model's top-level module holds
    itself beside its layers (a learned position embedding, ``self.pos``): that is listed on its
    own, named after the parameter (``"pos"``, its ``state_dict`` key) with ``type`` "Parameter",
    because the top-level module's path is empty. (No submodule can share such a name.)"""

    name: str
    type: str
    params: int
    reason: str


def shown_name(name: str) -> str:
    """A module path as a person reads it: the top-level module's empty path as ``<root>``."""
    return name or ROOT_NAME


@dataclass(frozen=True)
class ModelAnalysis:
    layers: tuple[LayerInfo, ...]
    skipped: tuple[SkippedModule, ...]
    total_params: int
    float32_bytes: int = field(default=0)  # parameters and buffers at 4 bytes each

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def weight_params(self) -> int:
        return sum(layer.weight_params for layer in self.layers)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}


def _underlying_weight(module: nn.Module) -> torch.Tensor | None:
    """A layer's ``weight`` as stored: the Parameter itself, or the original under its parametrization."""
    if parametrize.is_parametrized(module, "weight"):
        # a parametrization over several tensors (weight norm's original0/1) has no one original
        return getattr(cast(nn.ModuleDict, module.parametrizations).weight, "original", None)
    return module._parameters.get("weight")


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Layers whose ``weight`` is one Parameter shared with other layers, as leader -> followers.

    The leader is the group's first module in the model's module order; the element-wise operators
    compress the shared tensor once through the leader's plan entry, and the followers compute with
    the leader's parametrized weight (:func:`~tightfit.operators.plan.apply_plan_inplace`). Only
    groups whose every module is an element-wise layer of one ``weight`` (a Linear, a convolution, an
    Embedding, a matrix layer; not a recurrent layer) count; :func:`analyze` leaves any other sharing
    alone. Works before and after compression (a parametrized weight is grouped by its original).
    """
    members: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = _underlying_weight(module)
        if weight is not None:
            members.setdefault(id(weight), []).append((name, module))
    groups: dict[str, list[str]] = {}
    for group in members.values():
        if len(group) < 2:
            continue
        kinds = [layer_kind(module) for _, module in group]
        if any(kind is None or kind in RECURRENT_KINDS for kind in kinds):
            continue
        weight = _underlying_weight(group[0][1])
        in_group = {id(module) for _, module in group}
        if any(  # the Parameter must be nobody's other tensor (a bias, a norm's scale) too
            p is weight and not (key == "weight" and id(m) in in_group)
            for m in model.modules()
            if not isinstance(m, parametrize.ParametrizationList)
            for key, p in m._parameters.items()
        ):
            continue
        groups[group[0][0]] = [name for name, _ in group[1:]]
    return groups


def analyze(model: nn.Module) -> ModelAnalysis:
    """List the compressible layers of ``model`` and the parameter-holding modules left alone."""
    shared = _shared_parameters(model)
    tied = tied_groups(model)
    following = {name for names in tied.values() for name in names}
    layers: list[LayerInfo] = []
    skipped: list[SkippedModule] = []
    for name, module in model.named_modules():
        own = {k: p for k, p in module._parameters.items() if p is not None}
        if parametrize.is_parametrized(module):
            skipped.append(SkippedModule(name, type(module).__name__, _count(module), "already parametrized"))
            continue
        if not own or name in following:  # a tied weight's follower is compressed through its leader
            continue
        n_params = sum(p.numel() for p in own.values())
        kind = layer_kind(module)
        found = [own.get(w) for w in weight_names(module)] if kind is not None else []
        weights = [w for w in found if w is not None]
        if kind is not None and found and len(weights) == len(found):  # every weight tensor is there
            if any(id(w) in shared for w in weights) and name not in tied:
                skipped.append(
                    SkippedModule(name, type(module).__name__, n_params, "weight is shared with another module")
                )
                continue
            if not all(w.is_floating_point() for w in weights):
                skipped.append(SkippedModule(name, type(module).__name__, n_params, f"weight dtype {weights[0].dtype}"))
                continue
            layers.append(
                LayerInfo(
                    name=name,
                    type=type(module).__name__,
                    kind=kind,
                    weight_shape=tuple(weights[0].shape),
                    params=n_params,
                    weight_params=sum(w.numel() for w in weights),
                    tied=tuple(tied.get(name, ())),
                )
            )
        elif isinstance(module, nn.Embedding) and module.sparse:
            skipped.append(
                SkippedModule(
                    name,
                    type(module).__name__,
                    n_params,
                    "sparse=True embedding: its sparse gradients cannot pass a parametrization",
                )
            )
        elif (reason := _why_left_alone(module)) is not None:
            skipped.append(SkippedModule(name, type(module).__name__, n_params, reason))
        else:
            skipped += _own_parameters(name, module, own)
    total = sum(p.numel() for p in model.parameters())
    f32 = 4 * (total + sum(b.numel() for b in model.buffers() if b.is_floating_point()))
    return ModelAnalysis(tuple(layers), tuple(skipped), total, f32)


def _why_left_alone(module: nn.Module) -> str | None:
    """Why no built-in operator compresses a module's own parameters, in the user's terms; None for
    parameters a module holds itself beside its layers (see :func:`_own_parameters`)."""
    if isinstance(module, nn.RNNBase):
        return (
            "recurrent layer other than nn.LSTM / nn.GRU / nn.RNN (or a torch whose recurrent layers do "
            "not re-read parametrized weights): no built-in operator compresses it; left unchanged"
        )
    if isinstance(module, nn.MultiheadAttention):
        return (
            "attention's packed q/k/v projection is not a Linear; left unchanged (its out_proj is a layer of its "
            "own, and StructuredPrune removes whole heads)"
        )
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or (
        type(module).__name__.endswith("Norm") and all(p.dim() == 1 for p in module.parameters(recurse=False))
    ):  # also a library's own (Hugging Face's LlamaRMSNorm, T5LayerNorm)
        return "normalization layer: a few scale and shift values per channel; left unchanged"
    if any(True for _ in module.children()):
        return None
    return "no built-in operator for this type; left unchanged"


def _own_parameters(name: str, module: nn.Module, own: dict[str, nn.Parameter]) -> list[SkippedModule]:
    """Parameters a module holds itself beside its layers: one entry for the module, or for the
    top-level module (whose path is empty), one per parameter, named after it."""
    if name:
        return [
            SkippedModule(
                name,
                type(module).__name__,
                sum(p.numel() for p in own.values()),
                f"parameter(s) held directly by this module, not by a layer ({', '.join(sorted(own))}); left unchanged",
            )
        ]
    return [
        SkippedModule(
            key,
            "Parameter",
            param.numel(),
            f"held directly by the model's top-level module ({type(module).__name__}), not by a layer; left unchanged",
        )
        for key, param in own.items()
    ]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _compressible_under(model: nn.Module, layer_names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Compressible modules at or below the named layers (a structural operator may have replaced a
    layer by several smaller ones)."""
    found: dict[str, nn.Module] = {}
    for name in layer_names:
        root = model.get_submodule(name) if name else model
        for sub_name, sub in root.named_modules(prefix=name):
            if layer_kind(sub) is not None:
                found[sub_name] = sub
    return list(found.items())


def count_nonzeros(model: nn.Module, layer_names: Sequence[str]) -> tuple[int, int]:
    """(nonzero, total) entries of the effective weights at or below the named layers.

    Reads ``module.weight`` (a recurrent layer's weight matrices), which for a parametrized layer
    is the compressed weight.
    """
    nonzero = total = 0
    with torch.no_grad():
        for _, module in _compressible_under(model, layer_names):
            for weight in layer_weights(module):
                nonzero += int(torch.count_nonzero(weight))
                total += weight.numel()
    return nonzero, total


def zeroed_layers(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """The compressible layers (at or below ``layer_names``) whose weights are all zero."""
    with torch.no_grad():
        return [
            name
            for name, module in _compressible_under(model, layer_names)
            if all(int(torch.count_nonzero(w)) == 0 for w in layer_weights(module))
        ]


def zeroed_note(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """A result's note when compression left a layer without a nonzero weight: the nonzero-weight
    ratio then counts the whole layer as removed, and the layer's output no longer depends on its
    input (a pruning of 0.99 rounds to every weight of a layer of 50 or fewer)."""
    zeroed = zeroed_layers(model, layer_names)
    if not zeroed:
        return []
    nonzero, total = count_nonzeros(model, layer_names)
    shown = ", ".join(zeroed[:6]) + (f" and {len(zeroed) - 6} more" if len(zeroed) > 6 else "")
    figure = (
        f"{total / nonzero:.1f}x fewer nonzero weights ({nonzero:,} of {total:,} left)"
        if nonzero
        else f"no nonzero weight left of {total:,}"
    )
    return [
        f"Layer(s) {shown} have no nonzero weight left: their outputs no longer depend on their inputs (a "
        f"bias at most) ({figure}). If that is not meant, cap the sparsity below 1 - 1/(the layer's weight count)."
    ]


def layer_flops(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Dense FLOPs of one forward pass per module name, counted by ``torch.utils.flop_counter``.

    The key ``""`` holds the whole model's count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_input)
    finally:
        model.train(was_training)
    flops: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        total = int(sum(per_op.values()))
        if key == "Global":
            flops[""] = total
            continue
        # Keys are "<RootClass>.<qualified.name>"; the root alone is the whole model again.
        _, _, qualified = key.partition(".")
        if qualified:
            flops[qualified] = total
    flops.setdefault("", 0)
    return flops


def sparse_flops(model: nn.Module, example_input: Any, layer_names: Sequence[str]) -> int:
    """FLOPs counting only nonzero weights: each compressible layer's dense count times its weight
    density (the modules a tied weight's leader shares it with included). This is the figure the
    pruning literature quotes; it is not a speed.
    """
    per_module = layer_flops(model, example_input)
    total = per_module[""]
    layers = _compressible_under(model, layer_names)
    tied = tied_groups(model)  # a tied weight's followers compute with its compressed tensor too
    layers += [(follower, model.get_submodule(follower)) for name, _ in layers for follower in tied.get(name, [])]
    with torch.no_grad():
        for name, module in layers:
            weights = layer_weights(module)
            density = sum(float(torch.count_nonzero(w)) for w in weights) / max(1, sum(w.numel() for w in weights))
            total -= round(per_module.get(name, 0) * (1.0 - density))
    return total
