"""Learning-compression (L-C), as in Condensa (Joseph et al.) after Carreira-Perpinan's LC algorithm.

The compressed model arrives with its plan applied as parametrizations: each compressed weight is
``chain(original)``. L-C trains the *uncompressed* weights ``w = chain.original`` (the projecting
steps are switched off while it does, so the forward pass sees ``w``) on

    loss(w) + mu/2 * ||w - theta - lambda/mu||^2          (L-step, the augmented Lagrangian)

(each L-step iteration: an optimizer step on the loss, then the exact proximal step of the
quadratic penalty, so any ``mu`` is stable)
and alternates with

    theta = Pi(w - lambda/mu)                             (C-step: the operators' projection)
    lambda <- lambda - mu * (w - theta)                   (multiplier update)
    mu <- min(mu * mu_factor, mu_max)

``Pi`` is the chain of :class:`~tightfit.operators.Projection` steps (magnitude mask at the
layer's sparsity, rounding onto the quantization grid, ...), which re-fit themselves to ``theta``.
After each epoch the compressed model (originals set to ``theta``) is scored with ``evaluate``
(validation data, never test); the best one is what the model holds at the end. Its originals
*are* ``theta``, so the parametrized forward is exactly the compressed model that gets saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError, EvaluationError
from ..evaluation.metrics import evaluate_metric
from ..operators.base import Hyperparameter, Projection
from ._base import LossFn, Recovery, Site, check_optimizer, make_optimizer, projectable, sites, swapped_steps


@torch.no_grad()
def project(site: Site, weight: torch.Tensor) -> torch.Tensor:
    """The C-step for one site: the chain's projections applied in order (each re-fits itself)."""
    theta = weight.detach()
    for step in site.steps():
        theta = cast(Projection, step).project(theta)  # L-C keeps only projectable sites
    return theta


@torch.no_grad()
def c_step(w: torch.Tensor, lam: torch.Tensor, mu: float, site: Site) -> torch.Tensor:
    """``theta = Pi(w - lambda/mu)``."""
    return project(site, w - lam / mu)


@torch.no_grad()
def multiplier_update(lam: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, mu: float) -> torch.Tensor:
    """``lambda <- lambda - mu * (w - theta)`` (returns the new tensor)."""
    return lam - mu * (w.detach() - theta)


def penalty(w: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor, mu: float) -> torch.Tensor:
    """``mu/2 * ||w - theta - lambda/mu||^2``, differentiable in ``w``."""
    return 0.5 * mu * (w - theta - lam / mu).pow(2).sum()


@torch.no_grad()
def penalty_prox(w: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor, mu: float, step: float) -> None:
    """The exact proximal step of the penalty with step size ``step`` (in place):
    ``w <- (w + step*mu*(theta + lambda/mu)) / (1 + step*mu)``. Stable for any ``mu``, where a
    gradient step on the penalty diverges once ``step*mu > 2`` (and Adam's normalisation makes
    it crawl)."""
    a = step * mu
    w.copy_((w + a * (theta + lam / mu)) / (1.0 + a))


class LearningCompression(Recovery):
    """L-C recovery: ``LearningCompression(train_loader, evaluate=Accuracy(val_loader))``.

    ``c_steps_per_epoch`` C-steps are spread evenly over each epoch; ``mu`` starts at ``mu`` and is
    multiplied by ``mu_factor`` after every C-step, up to ``mu_max``. ``mu_factor=None`` picks the
    factor that reaches ``mu_max`` at the last C-step, so the schedule fits the training budget
    (Condensa's fixed 1.1 assumes far longer runs; on LeNet-300-100/digits with 20 epochs these
    defaults come to about 1.1). ``evaluate`` (higher is
    better) chooses the best compressed model among the epochs' ends; without it the last is kept.
    Sites whose parametrizations cannot all project are trained as plain fine-tuning does.
    """

    name = "lc"

    def __init__(
        self,
        loader: Iterable,
        *,
        epochs: int = 6,
        lr: float = 0.05,
        optimizer: str = "sgd",
        mu: float = 1e-3,
        mu_factor: float | None = None,
        mu_max: float = 10.0,
        c_steps_per_epoch: int = 4,
        multipliers: bool = True,
        penalty_step: float | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        loss: LossFn | None = None,
        max_steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(loader, epochs=epochs, lr=lr, loss=loss, max_steps=max_steps, device=device)
        if not mu > 0 or not mu_max >= mu:
            raise ConfigError(f"LearningCompression: need 0 < mu <= mu_max, but got (mu={mu}, mu_max={mu_max}).")
        if mu_factor is not None and not mu_factor >= 1:
            raise ConfigError(f"LearningCompression: `mu_factor` must be >= 1, but got {mu_factor!r}.")
        if not isinstance(c_steps_per_epoch, int) or c_steps_per_epoch < 1:
            raise ConfigError(
                f"LearningCompression: `c_steps_per_epoch` must be a whole number >= 1, but got {c_steps_per_epoch!r}."
            )
        if evaluate is not None and not callable(evaluate):
            raise ConfigError("LearningCompression: `evaluate` must be a callable(model) -> float on validation data.")
        self.optimizer = check_optimizer(optimizer, "LearningCompression")
        self.mu = float(mu)
        self.mu_factor = float(mu_factor) if mu_factor is not None else None
        self.mu_max = float(mu_max)
        self.c_steps_per_epoch = c_steps_per_epoch
        self.multipliers = multipliers
        #: step size of the penalty's proximal step (None: the learning rate, also when lr is tuned)
        self.penalty_step = float(penalty_step) if penalty_step is not None else None
        self.evaluate = evaluate
        #: (epoch, mu, validation metric) of the last call, for inspection.
        self.history: list[tuple[int, float, float | None]] = []

    def tunable(self) -> dict[str, Hyperparameter]:
        return {
            **super().tunable(),
            "mu": Hyperparameter("mu", low=1e-4, high=1.0, log=True),
            "mu_factor": Hyperparameter("mu_factor", low=1.05, high=2.0),
            "c_steps_per_epoch": Hyperparameter("c_steps_per_epoch", low=1, high=16, integer=True),
        }

    def _repr_args(self) -> dict[str, Any]:
        return {**super()._repr_args(), "mu": self.mu, "mu_factor": self.mu_factor, "mu_max": self.mu_max}

    def __call__(self, model: nn.Module) -> None:
        lc_sites = sites(model, projectable)
        if not lc_sites:
            raise ConfigError(
                "LearningCompression: the model has no compressed weight whose operators can project "
                "(e.g. Prune, Quantize). Give it a model with a plan applied (compress() does this)."
            )
        self.history = []
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(self.optimizer, params, self.lr)
        identity = [swap for s in lc_sites for i in range(len(s.chain)) for swap in s.swap(i, nn.Identity())]
        ws = [s.original for s in lc_sites]
        thetas = [project(s, w) for s, w in zip(lc_sites, ws)]  # lambda = 0 at the start
        lams = [torch.zeros_like(w) for w in ws]
        mu = self.mu
        every = max(1, self.steps_per_epoch() // self.c_steps_per_epoch)
        factor = self.mu_factor
        if factor is None:
            n_c = max(1, self.epochs * -(-self.steps_per_epoch() // every) - 1)
            factor = max(1.0, (self.mu_max / self.mu) ** (1.0 / n_c))
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        was_training = model.training
        try:
            step_in_epoch = 0
            for epoch, last, batch in self.batches():
                step_in_epoch += 1
                model.train()
                with swapped_steps(identity):  # the forward pass sees the uncompressed w
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(model, batch)
                    if not torch.isfinite(loss):
                        raise EvaluationError(
                            f"LearningCompression diverged: the loss became {float(loss.detach())} at step {self.steps_taken} "
                            f"(epoch {epoch}); lower `lr` (now {self.lr:g}) or tune it with Tuned(..., lr=(lo, hi))."
                        )
                    loss.backward()
                    opt.step()
                # L-step as proximal gradient: a step on the loss, then the penalty's exact prox
                for w, t, lam in zip(ws, thetas, lams):
                    penalty_prox(w, t, lam, mu, self.penalty_step or self.lr)
                if step_in_epoch % every == 0 or last:
                    thetas = [c_step(w, lam, mu, s) for s, w, lam in zip(lc_sites, ws, lams)]
                    if self.multipliers:  # off: the quadratic-penalty method (lambda stays 0)
                        lams = [multiplier_update(lam, w, t, mu) for lam, w, t in zip(lams, ws, thetas)]
                    mu = min(mu * factor, self.mu_max)
                if last:
                    step_in_epoch = 0
                    best = self._score(model, ws, thetas, epoch, mu, best)
            if self.steps_taken == 0:  # nothing trained: the plan's own compression, projected
                best = self._score(model, ws, thetas, -1, mu, best)
        finally:
            model.train(was_training)
        assert best is not None
        model.load_state_dict(best[1])

    def _score(self, model, ws, thetas, epoch, mu, best):
        """Put theta into the model (the compressed model), score it, keep it if best, restore w."""
        saved = [w.detach().clone() for w in ws]
        with torch.no_grad():
            for w, t in zip(ws, thetas):
                w.copy_(t)
        metric = evaluate_metric(self.evaluate, model) if self.evaluate is not None else None
        self.history.append((epoch, mu, metric))
        if best is None or metric is None or metric >= best[0]:
            # Ties go to the later epoch: longer training, same validation score.
            best = (
                metric if metric is not None else 0.0,
                {k: v.detach().clone() for k, v in model.state_dict().items()},
            )
        with torch.no_grad():
            for w, s in zip(ws, saved):
                w.copy_(s)
        return best
