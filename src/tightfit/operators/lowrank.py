"""Low-rank factorization: a Linear/Conv layer becomes two smaller layers via truncated SVD.

A matrix layer (a leaf holding only a 2-D weight, e.g. GPT-2's ``Conv1D``) is factorized too when
it is checked to be a plain affine map (:func:`.matrix.linear_equivalent`): it becomes two Linears.

``W (out x in·k) ~= B (out x r) @ A (r x in·k)``: a Linear becomes ``Linear(in, r) -> Linear(r, out)``,
a convolution becomes ``Conv(in, r, k) -> Conv(r, out, 1)``. It is applied only where it lowers
the layer's multiply count, ``r·(in·k + out) < out·in·k``; elsewhere the layer is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.analysis import MATRIX_KIND, RECURRENT_KINDS, LayerInfo, layer_kind
from .base import Hyperparameter, Operator, parse_range
from .matrix import NOT_AFFINE, linear_equivalent, swap_layer, unswappable

_FACTORIZABLE = {"Linear", "Conv1d", "Conv2d", "Conv3d"}


def _dims(module: nn.Module) -> tuple[int, int]:
    """(out, in·kernel) of the layer's weight seen as a matrix."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def factor_rank(out_dim: int, in_dim: int, rank_ratio: float) -> int | None:
    """The rank for ``rank_ratio`` of the full rank, or None when factorizing would not be cheaper."""
    full = min(out_dim, in_dim)
    rank = max(1, int(round(rank_ratio * full)))
    if rank * (in_dim + out_dim) >= out_dim * in_dim:
        return None
    return rank


class Factorized(nn.Sequential):
    """Two layers standing in for one: ``first`` (rank ``r``) then ``second`` (a 1x1 map to the
    outputs). ``weight`` and ``bias`` give the one layer they equal, for parents that read them
    instead of calling the layer: ``nn.TransformerEncoderLayer``'s fused inference path reads
    ``linear1.weight``, ``nn.MultiheadAttention`` reads ``out_proj.weight``. Such a parent computes
    with the dense product (the same outputs, no speed-up); the saved file holds the factors only."""

    @property
    def weight(self) -> torch.Tensor:
        first, second = self[0].weight, self[1].weight
        dense = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
        return dense.reshape(second.shape[0], *first.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias


def _pair(module: nn.Module, rank: int) -> Factorized:
    """The two layers that replace ``module`` at ``rank`` (weights not yet set)."""
    out_dim, _ = _dims(module)
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, out_dim, bias=has_bias)
    else:
        conv = type(module)
        first = conv(
            module.in_channels,
            rank,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
        )
        second = conv(rank, out_dim, 1, bias=has_bias)
    pair = Factorized(first, second).to(
        device=module.weight.device, dtype=module.weight.dtype
    )  # a float64 / GPU model stays so
    pair.train(module.training)
    return pair


def factorize(module: nn.Module, rank: int) -> Factorized:
    """Two layers whose product is the best rank-``rank`` approximation of ``module``'s weight."""
    weight = module.weight.detach()
    out_dim, in_dim = _dims(module)
    u, s, vh = torch.linalg.svd(weight.reshape(out_dim, in_dim).double(), full_matrices=False)
    root = s[:rank].sqrt()
    pair = _pair(module, rank)
    first, second = pair[0], pair[1]
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).to(weight.dtype).reshape(first.weight.shape))  # r x in·k
        second.weight.copy_((u[:, :rank] * root[None, :]).to(weight.dtype).reshape(second.weight.shape))  # out x r
        if module.bias is not None:
            second.bias.copy_(module.bias.detach())
    return pair


def _as_factorizable(module: nn.Module) -> nn.Module | None:
    """``module`` itself if LowRank knows its type, its Linear equivalent for a matrix layer, else None."""
    if type(module).__name__ in _FACTORIZABLE:
        return module if getattr(module, "groups", 1) == 1 else None
    if layer_kind(module) == MATRIX_KIND:
        return linear_equivalent(module)
    return None


class LowRank(Operator):
    """Factorize Linear/Conv layers by truncated SVD, keeping ``rank_ratio`` of the full rank.

    ``rank_ratio`` is a fixed fraction in (0, 1] or a ``(low, high)`` range searched per layer
    (default ``(0.05, 1.0)``); 1.0 leaves the layer whole. Layers whose factorization would not be
    cheaper at the chosen rank are left whole too, so the search never pays for a factorization.
    """

    name = "low_rank"
    structural = True

    def __init__(
        self, rank_ratio: float | tuple[float, float] = (0.05, 1.0), *, layers: list[str] | None = None
    ) -> None:
        super().__init__(layers=layers)
        low, high = parse_range("LowRank", "rank_ratio", rank_ratio, lambda v: 0.0 < v <= 1.0, "(0, 1]")
        self.rank_ratio = (low, high)
        self._grouped: set[str] = set()
        self._matrix: dict[str, tuple[int, int]] = {}
        self._refused: dict[str, str] = {}

    def prepare(self, model: nn.Module, example_input: Any) -> None:
        # Grouped/depthwise convolutions are not one matrix: leave them whole.
        self._grouped = {name for name, m in model.named_modules() if getattr(m, "groups", 1) != 1}
        # each layer as LowRank would factorize it (a matrix layer checked once, as its Linear equivalent)
        factorizable = {name: f for name, m in model.named_modules() if name and (f := _as_factorizable(m)) is not None}
        # matrix layers (e.g. GPT-2's Conv1D) that are a plain affine map: (out, in) of their Linear equivalent
        self._matrix = {
            name: (f.out_features, f.in_features)
            for name, f in factorizable.items()
            if f is not model.get_submodule(name)
        }
        # matrix layers that are no affine map, and layers whose parent reads their weight directly
        # (attention's output projection, fused fast paths): found by swapping in a rank-1 pair
        self._refused = {
            name: NOT_AFFINE
            for name, m in model.named_modules()
            if name and name not in factorizable and layer_kind(m) == MATRIX_KIND
        }
        if example_input is not None:
            pairs = {name: _pair(as_layer, 1) for name, as_layer in factorizable.items()}
            self._refused.update(unswappable(model, example_input, pairs, same_output=False))
        self._grouped |= set(self._refused)

    def refused(self) -> dict[str, str]:
        return dict(self._refused)

    def supports(self, layer: LayerInfo) -> bool:
        if not layer.name or layer.name in self._grouped:
            return False
        if layer.kind == MATRIX_KIND and layer.name in self._matrix:
            out_dim, in_dim = self._matrix[layer.name]
        elif layer.type in _FACTORIZABLE:
            out_dim = layer.weight_shape[0]
            in_dim = layer.weight_params // max(1, out_dim)
        else:
            return False
        return factor_rank(out_dim, in_dim, self.rank_ratio[0]) is not None

    def why_not_tied(self, tied: list[str]) -> str:
        return (
            f"low_rank would replace the layer by two factors, untying its weight from {', '.join(tied)} "
            "(tied weights), which read the whole matrix; prune / quantize compress the shared weight instead"
        )

    def why_not(self, layer: LayerInfo) -> str | None:
        if layer.kind in RECURRENT_KINDS:
            return (
                "low_rank does not factorize a recurrent layer's gate matrices (the layer's kernel takes them "
                "whole); prune / quantize compress them"
            )
        if layer.name in self._grouped and layer.name not in self._refused:
            return "low_rank leaves a grouped or depthwise convolution whole: its weight is not one matrix"
        if layer.type in _FACTORIZABLE or layer.name in self._matrix:
            return (
                f"low_rank would not make it cheaper: two factors even at rank_ratio {self.rank_ratio[0]:g} hold "
                f"as many weights as its {'x'.join(map(str, layer.weight_shape))} weight"
            )
        return None

    def hyperparameters(self, layer: LayerInfo) -> list[Hyperparameter]:
        low, high = self.rank_ratio
        return [Hyperparameter("rank_ratio", low=low, high=high)]

    def identity(self) -> dict[str, Any]:
        return {"rank_ratio": 1.0}

    def apply(self, module: nn.Module, settings: dict[str, Any]) -> None:
        raise ConfigError("LowRank replaces layers in their parent; apply a plan with tightfit.apply.")

    def apply_to_model(self, model: nn.Module, settings_by_layer: dict[str, dict[str, Any]]) -> None:
        for layer_name, settings in settings_by_layer.items():
            ratio = float(settings["rank_ratio"])
            if not 0.0 < ratio <= 1.0:
                raise ConfigError(f"LowRank: layer {layer_name!r} has rank_ratio {ratio!r}; it must lie in (0, 1].")
            original = model.get_submodule(layer_name)
            module = _as_factorizable(original)
            if module is None:
                raise ConfigError(f"LowRank cannot factorize layer {layer_name!r} ({type(original).__name__}).")
            rank = factor_rank(*_dims(module), ratio)
            if rank is None:
                continue  # not cheaper at this rank: the layer stays whole
            swap_layer(model, layer_name, factorize(module, rank))

    def config(self) -> dict[str, Any]:
        return {"rank_ratio": list(self.rank_ratio), **super().config()}
