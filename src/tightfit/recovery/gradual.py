"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune", 2017) as a recovery.

One-shot pruning removes the plan's weights before any training, so fine-tuning starts from a
damaged network. Here the plan's per-layer sparsities are the *end point*: the masks open fully
when recovery starts (the uncompressed weights are still under the parametrization), and each
layer's sparsity then follows the cubic schedule

    s(t) = s_target + (s_start - s_target) * (1 - t / T_ramp)^3

(``s_start`` = the fraction of weights already exactly zero, so a model pruned earlier, e.g. in
an iterative prune-and-adjust loop, keeps its zeros), re-choosing the smallest-magnitude weights every ``update_every`` steps. Pruning fast early (when
many weights are redundant) and slowly near the target lets the remaining weights take over
before the next cut. After ``T_ramp`` the masks hold and training continues as masked
fine-tuning, with the learning rate dropped by ``final_lr`` for the last ``final_fraction`` of the
steps. The model ends with exactly the plan's sparsity per layer, as ordinary masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..operators.base import Hyperparameter
from ..operators.prune import WeightMask, magnitude_mask
from ._base import LossFn, Recovery, Site, check_optimizer, make_optimizer, sites


def cubic_sparsity(target: float, progress: float, start: float = 0.0) -> float:
    """The schedule's sparsity at ``progress`` in [0, 1] of the ramp: ``start`` at 0, ``target`` at 1
    and after."""
    progress = min(1.0, max(0.0, progress))
    return target + (start - target) * (1.0 - progress) ** 3


class GradualPrune(Recovery):
    """Reach each layer's planned sparsity gradually while training (a :class:`Recovery`).

    ``ramp``: fraction of the training steps over which the sparsity grows (the rest is masked
    fine-tuning). ``update_every``: steps between mask updates during the ramp. ``final_lr`` and
    ``final_fraction``: the learning rate is multiplied by ``final_lr`` for the last
    ``final_fraction`` of the steps (1.0 / 0.0 turn this off).
    """

    name = "gradual"

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int = 6,
        lr: float = 1e-3,
        optimizer: str = "adam",
        ramp: float = 0.7,
        update_every: int = 5,
        final_lr: float = 0.1,
        final_fraction: float = 0.15,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        if not 0.0 < ramp <= 1.0:
            raise ConfigError(
                f"GradualPrune: `ramp` must lie in (0, 1] (a fraction of the training steps), but got {ramp!r}."
            )
        if not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"GradualPrune: `update_every` must be a whole number >= 1, but got {update_every!r}.")
        if not 0.0 < final_lr <= 1.0:
            raise ConfigError(f"GradualPrune: `final_lr` must lie in (0, 1] (a factor on `lr`), but got {final_lr!r}.")
        if not 0.0 <= final_fraction < 1.0:
            raise ConfigError(f"GradualPrune: `final_fraction` must lie in [0, 1), but got {final_fraction!r}.")
        self.optimizer = check_optimizer(optimizer, "GradualPrune")
        self.ramp = float(ramp)
        self.update_every = update_every
        self.final_lr = float(final_lr)
        self.final_fraction = float(final_fraction)

    def tunable(self) -> dict[str, Hyperparameter]:
        return {**super().tunable(), "ramp": Hyperparameter("ramp", low=0.3, high=0.9)}

    def __call__(self, model: nn.Module) -> None:
        targets: list[tuple[Site, WeightMask, float, float]] = []
        for site in sites(model):
            mask_step = next((step for step in site.chain if isinstance(step, WeightMask)), None)
            if mask_step is not None:
                already_zero = float((site.original == 0).float().mean())
                targets.append((site, mask_step, mask_step.sparsity, min(already_zero, mask_step.sparsity)))
        if not targets:
            raise ConfigError(
                "GradualPrune: the model has no pruning masks; apply a plan with Prune first (compress() does this)."
            )
        self.steps_taken = 0
        total = self.total_steps()
        if total == 0:
            return  # nothing to train: the plan's one-shot masks stay
        ramp_steps = max(1, round(self.ramp * total))
        drop_at = total - round(self.final_fraction * total) if self.final_fraction > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(self.optimizer, params, self.lr)

        def schedule(step: int) -> None:
            if step <= ramp_steps and step % self.update_every == 0:
                self._set_masks(targets, step / ramp_steps)
            if drop_at is not None and step == drop_at:
                for group in opt.param_groups:
                    group["lr"] = self.lr * self.final_lr

        try:
            # Adam's momentum keeps moving weights whose gradient the mask zeroed; pruned weights stay
            # at zero after every step so that a later (larger) cut never brings one back.
            self.fit(model, opt, before=schedule, after=lambda _step: self._zero_pruned(targets))
        finally:
            self._set_masks(targets, 1.0)  # exactly the plan's sparsity, even if training stopped early

    @staticmethod
    @torch.no_grad()
    def _set_masks(targets: list[tuple[Site, WeightMask, float, float]], progress: float) -> None:
        for site, mask_step, target, start in targets:
            mask = cast(torch.Tensor, mask_step.mask)  # a buffer: Module.__getattr__ says Tensor | Module
            mask.copy_(magnitude_mask(site.original, cubic_sparsity(target, progress, start)))
            site.original.mul_(mask)

    @staticmethod
    @torch.no_grad()
    def _zero_pruned(targets: list[tuple[Site, WeightMask, float, float]]) -> None:
        for site, mask_step, _, _ in targets:
            site.original.mul_(cast(torch.Tensor, mask_step.mask))

    def _repr_args(self) -> dict[str, Any]:
        return {**super()._repr_args(), "ramp": self.ramp, "update_every": self.update_every}
