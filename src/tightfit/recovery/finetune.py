"""Masked fine-tuning: the simplest recovery. Trains through the operators' parametrizations, so
pruned weights stay zero and quantized weights stay on their grid (straight-through gradients)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..evaluation.metrics import _logits, _split_batch, _to
from ..measure.analysis import call_model

LossFn = Callable[[nn.Module, Any], torch.Tensor]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: cross-entropy of the model's class scores on ``(inputs, labels)`` batches."""
    inputs, labels = _split_batch(batch)
    return F.cross_entropy(_logits(call_model(model, inputs)), labels)


class FineTune:
    """Train the compressed model for ``epochs`` passes over ``loader``.

    ``loss(model, batch) -> scalar tensor`` defaults to cross-entropy on ``(inputs, labels)``.
    ``max_steps`` caps the optimizer steps (useful for large data). ``steps_taken`` records the
    steps of the last call, for accounting.
    """

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int = 2,
        lr: float = 3e-4,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if loader is None or not hasattr(loader, "__iter__"):
            raise ConfigError(f"FineTune: `loader` must be an iterable of training batches, but got {loader!r}.")
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"FineTune: `epochs` must be a whole number >= 0, but got {epochs!r}.")
        if not lr > 0:
            raise ConfigError(f"FineTune: `lr` must be > 0, but got {lr!r}.")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"FineTune: `optimizer` must be one of {sorted(OPTIMIZERS)}, but got {optimizer!r}.")
        if max_steps is not None and max_steps < 0:
            raise ConfigError(f"FineTune: `max_steps` must be >= 0 or None, but got {max_steps!r}.")
        self.loader = loader
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.loss = loss or cross_entropy_loss
        self.max_steps = max_steps
        self.device = torch.device(device)
        self.steps_taken = 0

    def _make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        cls = OPTIMIZERS[self.optimizer]
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kwargs["momentum"] = self.momentum
        return cls(params, **kwargs)

    def __call__(self, model: nn.Module) -> None:
        self.steps_taken = 0
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or self.epochs == 0:
            return
        opt = self._make_optimizer(params)
        was_training = model.training
        model.train()
        try:
            for _ in range(self.epochs):
                for batch in self.loader:
                    if self.max_steps is not None and self.steps_taken >= self.max_steps:
                        return
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(model, _to(batch, self.device))
                    loss.backward()
                    opt.step()
                    self.steps_taken += 1
        finally:
            model.train(was_training)

    def __repr__(self) -> str:
        return f"FineTune(epochs={self.epochs}, lr={self.lr:g}, optimizer={self.optimizer!r})"
