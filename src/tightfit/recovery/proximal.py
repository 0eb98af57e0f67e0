"""Proximal sparse training as ``torch.optim`` optimizers.

- :class:`ProxSG`: proximal SGD for ``f(x) + lambda*||x||_1`` (soft-thresholding after each step),
  the plain baseline.
- :class:`OBProxSG` (Chen et al. 2020, "Orthant Based Proximal Stochastic Gradient Method for
  l1-Regularized Optimization"): ``n_p`` Prox-SG steps predict the support, then ``n_o`` orthant
  steps: a gradient step on ``f + lambda*sign(x)^T x`` over the orthant face of ``x``, projected
  back onto that face (entries that would change sign become exact zeros and stay zero).
  Defaults as in the authors' code: ``lambda_=1e-4``, ``n_o=inf`` (orthant steps to the end), ``eps=0``.
- :class:`HSPG` (Chen et al. 2020, "A Half-Space Stochastic Projected Gradient Method for Group
  Sparsity Regularization"): ``n_p`` group-proximal steps, then half-space steps that zero a whole
  group ``g`` when its trial point leaves the half-space ``{z: z^T x_g > eps*||x_g||^2}``.
  Defaults: ``lambda_=1e-3``, ``eps=0``. A group is one index along dim 0 of every tensor of a
  parameter group (an output neuron / channel: its weight row and its bias together).

Parameter groups take ``lambda_`` (0 means plain SGD, e.g. for biases or the output layer).
The sparsity reached is read off the weights: :func:`sparsity_report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

from ..errors import ConfigError


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """The proximal map of ``tau*||.||_1``: ``sign(x) * max(|x| - tau, 0)``."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def orthant_project(trial: torch.Tensor, zeta: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Keep entries of ``trial`` that stay in the orthant face ``zeta`` (``trial*zeta > eps``); zero the rest."""
    return torch.where(trial * zeta > eps, trial, torch.zeros_like(trial))


def group_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The dim-0 groups of several tensors side by side: ``n x d`` (a view is not possible; a copy)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def _scatter_rows(rows: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    start = 0
    for t in tensors:
        width = t[0].numel() if t.shape[0] else 0
        t.copy_(rows[:, start : start + width].reshape(t.shape))
        start += width


def group_soft_threshold(rows: torch.Tensor, tau: float) -> torch.Tensor:
    """The proximal map of ``tau * sum_g ||x_g||_2`` on rows: ``x_g * max(0, 1 - tau/||x_g||)``."""
    norms = rows.norm(dim=1, keepdim=True)
    scale = torch.clamp(1.0 - tau / torch.clamp(norms, min=1e-30), min=0.0)
    return rows * scale


def half_space_project(trial: torch.Tensor, rows: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Zero every group whose trial point leaves ``{z : z^T x_g > eps * ||x_g||^2}``; zero groups stay zero."""
    inner = (trial * rows).sum(dim=1, keepdim=True)
    sq = rows.pow(2).sum(dim=1, keepdim=True)
    keep = (inner > eps * sq) & (sq > 0)
    return torch.where(keep, trial, torch.zeros_like(trial))


def _check(name: str, value: float, low: float = 0.0) -> None:
    if not (isinstance(value, (int, float)) and value >= low):
        raise ConfigError(f"{name} must be a number >= {low}, but got {value!r}.")


class _Staged(torch.optim.Optimizer):
    """Counts steps; the first ``n_p`` of every ``n_p + n_o`` cycle are proximal steps."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], n_p: int, n_o: float) -> None:
        _check("`n_p`", n_p)
        _check("`n_o`", n_o)
        super().__init__(params, defaults)
        self.n_p = int(n_p)
        self.n_o = n_o
        self.steps = 0

    def proximal_phase(self) -> bool:
        cycle = self.n_p + self.n_o
        return math.isinf(cycle) and self.steps < self.n_p or not math.isinf(cycle) and self.steps % cycle < self.n_p

    def _momentum(self, p: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
        if momentum == 0:
            return grad
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad)
        return buf

    def _closure(self, closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class ProxSG(_Staged):
    """Proximal SGD: ``x <- soft_threshold(x - lr*grad, lr*lambda_)``."""

    def __init__(self, params: ParamsT, lr: float = 0.1, lambda_: float = 1e-4, momentum: float = 0.0) -> None:
        _check("ProxSG: `lr`", lr, 1e-12)
        _check("ProxSG: `lambda_`", lambda_)
        super().__init__(params, dict(lr=lr, lambda_=lambda_, momentum=momentum), n_p=1, n_o=0)

    @torch.no_grad()
    # torch types step as two overloads (no closure -> None, closure -> float); one signature covers both
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self._closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = self._momentum(p, p.grad, group["momentum"])
                p.copy_(soft_threshold(p - group["lr"] * d, group["lr"] * group["lambda_"]))
        self.steps += 1
        return loss


class OBProxSG(_Staged):
    """Orthant-based proximal SGD for ``f(x) + lambda_*||x||_1``.

    ``n_p`` proximal steps then ``n_o`` orthant steps, cycling (``n_o=inf``: orthant steps to the
    end, the authors' default). ``eps`` widens the projection (an entry survives when ``x*zeta > eps``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        lambda_: float = 1e-4,
        n_p: int = 100,
        n_o: float = math.inf,
        eps: float = 0.0,
    ) -> None:
        _check("OBProxSG: `lr`", lr, 1e-12)
        _check("OBProxSG: `lambda_`", lambda_)
        _check("OBProxSG: `eps`", eps)
        super().__init__(params, dict(lr=lr, lambda_=lambda_, eps=eps), n_p=n_p, n_o=n_o)

    @torch.no_grad()
    # torch types step as two overloads (no closure -> None, closure -> float); one signature covers both
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self._closure(closure)
        prox = self.proximal_phase()
        for group in self.param_groups:
            lr, lam, eps = group["lr"], group["lambda_"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if lam == 0:
                    p.add_(p.grad, alpha=-lr)
                elif prox:
                    p.copy_(soft_threshold(p - lr * p.grad, lr * lam))
                else:
                    zeta = torch.sign(p)  # the orthant face of the current point; zeros stay on it
                    trial = p - lr * (p.grad + lam * zeta) * (zeta != 0)
                    p.copy_(orthant_project(trial, zeta, eps))
        self.steps += 1
        return loss


class HSPG(_Staged):
    """Half-space stochastic projected gradient for ``f(x) + lambda_ * sum_g ||x_g||_2``.

    Groups are the dim-0 slices across all tensors of a parameter group (pass ``[weight, bias]``
    of a layer together: see :func:`neuron_groups`). ``n_p`` group-proximal steps, then half-space
    steps; ``momentum`` applies to the gradient as in the authors' code.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        lambda_: float = 1e-3,
        n_p: int = 100,
        eps: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        _check("HSPG: `lr`", lr, 1e-12)
        _check("HSPG: `lambda_`", lambda_)
        if not 0 <= eps < 1:
            raise ConfigError(f"HSPG: `eps` must lie in [0, 1), but got {eps!r}.")
        super().__init__(params, dict(lr=lr, lambda_=lambda_, eps=eps, momentum=momentum), n_p=n_p, n_o=math.inf)

    @torch.no_grad()
    # torch types step as two overloads (no closure -> None, closure -> float); one signature covers both
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self._closure(closure)
        prox = self.proximal_phase()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, lam = group["lr"], group["lambda_"]
            grads = [self._momentum(p, p.grad, group["momentum"]) for p in params]
            if lam == 0:
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-lr)
                continue
            sizes = {p.shape[0] for p in params}
            if len(sizes) != 1:
                raise ConfigError(
                    f"HSPG: tensors of one parameter group must share their dim-0 size (groups), but got {sorted(sizes)}."
                )
            rows, grad_rows = group_rows(params), group_rows(grads)
            if prox:
                new = group_soft_threshold(rows - lr * grad_rows, lr * lam)
            else:
                norms = rows.norm(dim=1, keepdim=True)
                nonzero = norms > 0
                direction = grad_rows + lam * rows / torch.clamp(norms, min=1e-30)
                trial = torch.where(nonzero, rows - lr * direction, torch.zeros_like(rows))
                new = half_space_project(trial, rows, group["eps"])
            _scatter_rows(new, params)
        self.steps += 1
        return loss


# ---------------------------------------------------------------------- groups and read-off
Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  #: the layers these methods regularize


def _layer_weight(module: Layer) -> torch.Tensor:
    """The trainable weight underneath any parametrization."""
    if hasattr(module, "parametrizations"):
        # parametrize's ModuleDict and ParametrizationList: Module.__getattr__ says Tensor | Module
        parametrizations = cast(nn.ModuleDict, module.parametrizations)
        if "weight" in parametrizations:
            return cast(torch.Tensor, parametrizations["weight"].original)
    return module.weight


def _prunable(model: nn.Module, exclude_last: bool) -> list[tuple[str, Layer]]:
    layers: list[tuple[str, Layer]] = [
        (n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    return layers[:-1] if exclude_last and layers else layers


def l1_groups(model: nn.Module, lambda_: float) -> list[dict]:
    """Parameter groups for :class:`ProxSG` / :class:`OBProxSG`: the weights of Linear/Conv
    layers get ``lambda_``; everything else (biases, norms, embeddings) ``lambda_=0``."""
    weights = {id(_layer_weight(m)) for _, m in _prunable(model, exclude_last=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    reg = [p for p in params if id(p) in weights]
    rest = [p for p in params if id(p) not in weights]
    return [g for g in ({"params": reg, "lambda_": lambda_}, {"params": rest, "lambda_": 0.0}) if g["params"]]


def neuron_groups(model: nn.Module, lambda_: float, *, exclude_last: bool = True) -> list[dict]:
    """Parameter groups for :class:`HSPG`: one per Linear/Conv layer holding ``[weight, bias]``,
    so each group is an output neuron / channel; the last such layer (the model's outputs) is
    left unregularized unless ``exclude_last=False``; all other parameters get ``lambda_=0``."""
    groups: list[dict] = []
    used: set[int] = set()
    for _, m in _prunable(model, exclude_last):
        tensors = [_layer_weight(m)] + ([m.bias] if m.bias is not None else [])
        tensors = [t for t in tensors if t.requires_grad]
        if tensors:
            groups.append({"params": tensors, "lambda_": lambda_})
            used.update(id(t) for t in tensors)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in used]
    if rest:
        groups.append({"params": rest, "lambda_": 0.0})
    return groups


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float | int]]:
    """Per Linear/Conv layer, read off the (compressed) weights: zero entries, and zero output
    neurons / channels (weight row zero and bias zero)."""
    report: dict[str, dict[str, float | int]] = {}
    for name, m in _prunable(model, exclude_last=False):
        w = m.weight.detach()
        rows = w.reshape(w.shape[0], -1)
        zero_rows = (rows == 0).all(dim=1)
        if m.bias is not None:
            zero_rows &= m.bias.detach() == 0
        report[name] = {
            "weights": w.numel(),
            "zeros": int((w == 0).sum()),
            "groups": w.shape[0],
            "zero_groups": int(zero_rows.sum()),
        }
    return report
