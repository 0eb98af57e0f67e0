"""Proximal sparse training as a recovery (``compress(finetune=SparseTraining(...))``), and the
physical removal of the whole neurons HSPG zeroes.

Trained through the plan's parametrizations: the l1 / group penalty acts on the uncompressed
weights underneath, so the zeros it makes add to the plan's own (pruned entries stay masked), and
the search measures the nonzeros of the saved model as usual.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..operators.base import Hyperparameter
from ._base import LossFn, Recovery
from .proximal import HSPG, OBProxSG, ProxSG, l1_groups, neuron_groups

METHODS = ("proxsg", "obproxsg", "hspg")


class SparseTraining(Recovery):
    """Train with :class:`ProxSG`, :class:`OBProxSG` or :class:`HSPG` (``method``).

    ``prox_fraction`` of the steps are proximal steps (OBProx-SG's ``N_P``, HSPG's switch), the
    rest orthant / half-space steps. ``lambda_`` weights the penalty; ``eps`` is the methods' own.
    """

    name = "sparse"

    def __init__(
        self,
        loader: Iterable,
        *,
        method: str = "obproxsg",
        epochs: int = 6,
        lr: float = 0.05,
        lambda_: float = 1e-4,
        prox_fraction: float = 0.5,
        eps: float = 0.0,
        momentum: float = 0.0,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        if method not in METHODS:
            raise ConfigError(f"SparseTraining: `method` must be one of {METHODS}, but got {method!r}.")
        if not 0 <= prox_fraction <= 1:
            raise ConfigError(f"SparseTraining: `prox_fraction` must lie in [0, 1], but got {prox_fraction!r}.")
        self.method = method
        self.lambda_ = float(lambda_)
        self.prox_fraction = float(prox_fraction)
        self.eps = float(eps)
        self.momentum = float(momentum)

    def tunable(self) -> dict[str, Hyperparameter]:
        return {
            **super().tunable(),
            "lambda_": Hyperparameter("lambda_", low=1e-5, high=1e-2, log=True),
            "prox_fraction": Hyperparameter("prox_fraction", low=0.1, high=0.9),
        }

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        n_p = int(round(self.prox_fraction * self.total_steps()))
        if self.method == "proxsg":
            return ProxSG(l1_groups(model, self.lambda_), lr=self.lr, lambda_=self.lambda_, momentum=self.momentum)
        if self.method == "obproxsg":
            return OBProxSG(
                l1_groups(model, self.lambda_), lr=self.lr, lambda_=self.lambda_, n_p=n_p, n_o=math.inf, eps=self.eps
            )
        return HSPG(
            neuron_groups(model, self.lambda_),
            lr=self.lr,
            lambda_=self.lambda_,
            n_p=n_p,
            eps=self.eps,
            momentum=self.momentum,
        )

    def __call__(self, model: nn.Module) -> None:
        self.fit(model, self.make_optimizer(model))

    def _repr_args(self) -> dict[str, Any]:
        return {"method": self.method, **super()._repr_args(), "lambda_": self.lambda_}


def remove_zero_neurons(
    model: nn.Sequential, example_input: torch.Tensor | None = None
) -> tuple[nn.Sequential, dict[str, int]]:
    """Physically remove the hidden neurons whose incoming weights and bias are all zero, from a
    ``Sequential`` MLP of Linear layers and element-wise activations (with ``f(0) = 0``: ReLU,
    Tanh, GELU...). Returns a smaller copy (baked, plain tensors) and ``{layer: neurons removed}``.

    With ``example_input``, the outputs of the copy are checked against the model's. For CNNs and
    graphs with skips, the zero channels HSPG leaves are removed by the structured-pruning operator
    (Torch-Pruning's dependency graph): :func:`~tightfit.recovery.sparsity_report` names them.
    """
    from ..export.artifact import bake

    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"remove_zero_neurons handles nn.Sequential MLPs, but got {type(model).__name__}; use structured pruning."
        )
    slim = cast(nn.Sequential, bake(model))  # a copy of the Sequential, masks folded in
    items = list(slim)
    linear_at = [i for i, m in enumerate(items) if isinstance(m, nn.Linear)]
    allowed = (nn.ReLU, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.Flatten, nn.SiLU, nn.Hardtanh)
    removed: dict[str, int] = {}
    for a, b in zip(linear_at, linear_at[1:]):
        between = items[a + 1 : b]
        if not all(isinstance(m, allowed) for m in between):
            continue  # something in between mixes neurons or maps 0 elsewhere: leave it
        first, second = cast(nn.Linear, items[a]), cast(nn.Linear, items[b])  # both in linear_at
        zero = (first.weight == 0).all(dim=1)
        if first.bias is not None:
            zero &= first.bias == 0
        keep = torch.nonzero(~zero).flatten()
        if keep.numel() == first.out_features or keep.numel() == 0:
            continue
        new_first = nn.Linear(first.in_features, keep.numel(), bias=first.bias is not None)
        new_second = nn.Linear(keep.numel(), second.out_features, bias=second.bias is not None)
        with torch.no_grad():
            new_first.weight.copy_(first.weight[keep])
            if first.bias is not None:
                new_first.bias.copy_(first.bias[keep])
            new_second.weight.copy_(second.weight[:, keep])
            if second.bias is not None:
                new_second.bias.copy_(second.bias)
        removed[str(a)] = int(first.out_features - keep.numel())
        items[a], items[b] = new_first, new_second
    slim = nn.Sequential(*items)
    if example_input is not None:
        with torch.no_grad():
            before, after = copy.deepcopy(model).eval()(example_input), slim.eval()(example_input)
        if not torch.allclose(before, after, atol=1e-5, rtol=1e-5):
            raise ModelError("remove_zero_neurons changed the model's outputs; its activations may not map 0 to 0.")
    return slim, removed
