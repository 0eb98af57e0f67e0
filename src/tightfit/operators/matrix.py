"""Matrix layers swapped for an ``nn.Linear``: shared by LowRank and Int8.

A matrix layer (``measure.analysis.MATRIX_KIND``: a leaf holding only a 2-D ``weight`` and maybe a
bias, e.g. Hugging Face GPT-2's ``Conv1D``) is no ``nn.Linear``, so neither an SVD into two Linears
nor ONNX Runtime's int8 kernels apply to it as it is. When a random input shows it computes an
affine map (:func:`linear_equivalent`), it is swapped for the ``nn.Linear`` computing the same
thing. Swapping is safe only if nothing but its own forward uses it: :func:`unswappable` tries
each swap on the model's example input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calling import call_model, output_tensors
from ..errors import ConfigError
from ..measure.analysis import MATRIX_KIND, layer_kind

#: Why a matrix layer is left alone when it has no Linear equivalent.
NOT_AFFINE = "holds a weight matrix but does not compute x @ W + b with it"


def linear_equivalent(module: nn.Module) -> nn.Linear | None:
    """An ``nn.Linear`` computing what a matrix layer computes, or None when it is not a plain
    affine map of its last dimension. Which way round the weight is used is not written anywhere
    (Hugging Face's ``Conv1D`` stores it ``in x out``, a hand-written layer may store it like
    ``nn.Linear``), so both are tried on a random input and kept only if the layer's own output
    matches."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return None
    requires_grad = weight.requires_grad
    weight = weight.detach()
    bias = module.bias.detach() if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    generator = torch.Generator().manual_seed(0)
    for matrix in (weight, weight.t()):  # used as x @ matrix (Conv1D), or as x @ weight.t() (Linear)
        in_dim, out_dim = matrix.shape
        if bias is not None and bias.shape != (out_dim,):
            continue
        x = torch.randn(3, in_dim, generator=generator, dtype=torch.float64).to(
            device=weight.device, dtype=weight.dtype
        )
        expected = x @ matrix + (bias if bias is not None else 0)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                got = module(x)
        except Exception:
            continue
        finally:
            module.train(was_training)
        if (
            isinstance(got, torch.Tensor)
            and got.shape == expected.shape
            and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
        ):
            linear = nn.Linear(in_dim, out_dim, bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(matrix.t())
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.requires_grad_(requires_grad)  # a frozen layer stays frozen
            linear.train(module.training)
            return linear
    return None


def swap_layer(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the layer ``name`` sits in its parent; returns the layer it took the place of."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def unswappable(
    model: nn.Module, example_input: Any, stand_ins: dict[str, nn.Module], *, same_output: bool
) -> dict[str, str]:
    """Layers of ``stand_ins`` (name -> module to put in their place) whose swap breaks the model
    on ``example_input``, with the reason: the forward pass fails (the parent reads the layer's
    ``weight`` directly: attention's output projection, fused fast paths) or, with ``same_output``
    (the stand-in computes what the layer does), the model's output changes (the parent uses the
    weight some other way). Each swap is tried for one forward pass, then undone; with
    ``same_output`` all are first tried at once, which settles the common case in one pass."""
    if not stand_ins:
        return {}
    was_training = model.training
    model.eval()
    try:
        reference = None
        if same_output:
            try:
                reference = _outputs(model, example_input)
                repeatable = _close(_outputs(model, example_input), reference)
            except Exception as exc:  # a model that cannot run its example input: nothing to check
                why = f"the model fails on the example input ({type(exc).__name__}), so no swap can be checked"
                return dict.fromkeys(stand_ins, why)
            if not repeatable:
                why = "the model's output on the example input changes from call to call, so no swap can be checked"
                return dict.fromkeys(stand_ins, why)

        def breaks(names: Iterable[str]) -> str | None:
            originals = {name: swap_layer(model, name, stand_ins[name]) for name in names}
            try:
                got = _outputs(model, example_input)
            except Exception as exc:
                names_list = list(names)
                parent = model.get_submodule(names_list[0].rpartition(".")[0]) if len(names_list) == 1 else None
                who = f"its parent ({type(parent).__name__})" if parent is not None else "its parent"
                return (
                    f"{who} cannot run with another module in its place, e.g. it reads the layer's weight "
                    f"itself ({type(exc).__name__}: {str(exc)[:80]})"
                )
            finally:
                for name, module in originals.items():
                    swap_layer(model, name, module)
            if reference is not None and not _close(got, reference):
                return (
                    "its parent uses its weight other than through its forward: an equivalent module in its "
                    "place changes the output"
                )
            return None

        if same_output and breaks(stand_ins) is None:
            return {}
        return {name: reason for name in stand_ins if (reason := breaks([name])) is not None}
    finally:
        model.train(was_training)


def swap_in_linears(model: nn.Module, names: Iterable[str], why: str) -> None:
    """Swap each named matrix layer of ``model`` for its Linear equivalent (other layers are left
    as they are); ``why`` names what needs it, for the error when a layer has none."""
    for name in names:
        module = model.get_submodule(name)
        if layer_kind(module) != MATRIX_KIND:
            continue
        linear = linear_equivalent(module)
        if linear is None:
            raise ConfigError(
                f"{why} needs layer {name!r} ({type(module).__name__}) as an nn.Linear, and there is none: "
                f"the layer {NOT_AFFINE}. Drop that layer from the plan."
            )
        swap_layer(model, name, linear)


def _outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().double() for t in output_tensors(call_model(model, example_input))]


def _close(got: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    """Equal up to float rounding: the tolerance the verified export uses (atol 1e-4, rtol 1e-3)."""
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference)):
        return False
    for g, r in zip(got, reference):
        if r.numel() and not float((g - r).abs().max()) <= 1e-4 + 1e-3 * float(r.abs().max()):
            return False
    return True
