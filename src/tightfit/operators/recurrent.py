"""Parametrizing every weight a layer's operators compress, recurrent layers' several included.

An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` computes with ``_flat_weights``, a list of its weight
tensors. Its forward re-reads that list from the attributes when they changed, so a parametrized
weight (a masked or rounded one) is what it computes with, and the gradient reaches the original
underneath. The list then holds tensors computed in the last forward, which ``copy.deepcopy``
refuses (it copies only graph leaves); :func:`_copy_with_leaf_weights` has the layer's
parametrized class copy the leaves instead, and the copy re-reads its weights at its first forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..measure.analysis import weight_names


def parametrize_weights(module: nn.Module, make_step: Callable[[torch.Tensor], nn.Module]) -> None:
    """Register ``make_step(weight)`` on each tensor of ``module`` that operators compress
    (:func:`~tightfit.measure.analysis.weight_names`): its ``weight``, or each weight matrix of a
    recurrent layer. ``weight`` is the tensor as it is now (after any earlier parametrization)."""
    for name in weight_names(module):
        parametrize.register_parametrization(module, name, make_step(getattr(module, name).detach()))
    if isinstance(module, nn.RNNBase):
        _copy_with_leaf_weights(type(module))


def _copy_with_leaf_weights(parametrized_class: type) -> None:
    """Make ``copy.deepcopy`` of a parametrized recurrent layer copy, in ``_flat_weights``, the
    originals under the parametrizations rather than the tensors the last forward computed.
    ``parametrized_class`` is the class ``torch.nn.utils.parametrize`` made for this one module
    (and the copies it makes), so nothing else changes."""
    plain_copy = parametrized_class.__deepcopy__
    if getattr(plain_copy, "_keeps_leaf_weights", False):
        return

    def deepcopy_with_leaf_weights(self: nn.RNNBase, memo: dict) -> nn.RNNBase:
        computed = self._flat_weights
        self.__dict__["_flat_weights"] = [
            self.parametrizations[name].original if parametrize.is_parametrized(self, name) else weight
            for name, weight in zip(self._flat_weights_names, computed)
        ]
        try:
            return plain_copy(self, memo)
        finally:
            self.__dict__["_flat_weights"] = computed

    deepcopy_with_leaf_weights._keeps_leaf_weights = True  # type: ignore[attr-defined]
    parametrized_class.__deepcopy__ = deepcopy_with_leaf_weights
