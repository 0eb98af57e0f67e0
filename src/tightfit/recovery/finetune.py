"""Masked fine-tuning: the simplest recovery. Trains through the operators' parametrizations, so
pruned weights stay zero and quantized weights stay on their grid (straight-through gradients)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ._base import LossFn, Recovery, check_optimizer, cross_entropy_loss, make_optimizer

#: learning-rate schedules of FineTune
SCHEDULES = ("constant", "cosine")


class FineTune(Recovery):
    """Train the compressed model for ``epochs`` passes over ``loader``.

    ``loss(model, batch) -> scalar tensor`` defaults to cross-entropy on ``(inputs, labels)``.
    ``max_steps`` caps the optimizer steps (useful for large data). ``steps_taken`` records the
    steps of the last call, for accounting. ``schedule="cosine"`` lowers the learning rate from
    ``lr`` to 0 along a half cosine over the planned steps, so the weights settle at the end as they
    did when a model trained with a decaying schedule (OneCycle, cosine) was made; ``"constant"``
    keeps ``lr`` throughout.
    """

    name = "finetune"

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
        schedule: str = "constant",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        if schedule not in SCHEDULES:
            raise ConfigError(f"FineTune: `schedule` must be one of {SCHEDULES}, but got {schedule!r}.")
        self.schedule = schedule
        self.optimizer = check_optimizer(optimizer, "FineTune")
        self.weight_decay = weight_decay
        self.momentum = momentum

    def __call__(self, model: nn.Module) -> None:
        self.steps_taken = 0
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or self.epochs == 0:
            return
        optimizer = make_optimizer(
            self.optimizer, params, self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        total = max(1, self.total_steps())

        def cosine(step: int) -> None:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))

        self.fit(model, optimizer, before=cosine if self.schedule == "cosine" else None)

    def __repr__(self) -> str:
        schedule = "" if self.schedule == "constant" else f", schedule={self.schedule!r}"
        return f"FineTune(epochs={self.epochs}, lr={self.lr:g}, optimizer={self.optimizer!r}{schedule})"


__all__ = ["FineTune", "cross_entropy_loss"]
