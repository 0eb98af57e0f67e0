"""Small GP helpers on BoTorch (imported lazily: BoTorch is slow to import)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


@contextmanager
def one_thread() -> Iterator[None]:
    """Fit and optimize small GPs on one thread: on a shared machine, thread hand-offs cost more
    than these few-hundred-point linear algebra problems (measured 0.4 s vs 7.8 s per fit under
    load). The caller's setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: L-BFGS iterations of a GP fit from the default (prior) hyperparameters, and of one started from
#: the previous trial's fitted ones (one more point changes them little; see docs/search.md)
COLD_MAXITER, WARM_MAXITER = 75, 20

#: JSON-ready hyperparameters of a fitted GP: raw parameter name -> flat list of floats
Hyperparameters = dict[str, list[float]]


def fit_gp(
    x: np.ndarray,
    y: np.ndarray,
    se: np.ndarray | None = None,
    *,
    init: Hyperparameters | None = None,
    maxiter: int | None = None,
):
    """A SingleTaskGP on ``n x d`` inputs in the unit cube and ``n`` outputs (standardized inside).

    When every observation carries a standard error, its square is the fixed observation noise;
    otherwise the noise level is learned. ``init`` (from :func:`hyperparameters` of an earlier
    fit) warm-starts the marginal-likelihood optimization; ``maxiter`` defaults to
    ``WARM_MAXITER`` when ``init`` matched the model and ``COLD_MAXITER`` otherwise."""
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    X = torch.as_tensor(x, dtype=torch.float64)
    Y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1)
    yvar = None
    if se is not None and len(se) and not np.isnan(se).any():
        yvar = torch.as_tensor(np.maximum(se, 1e-6) ** 2, dtype=torch.float64).reshape(-1, 1)
    model = SingleTaskGP(X, Y, train_Yvar=yvar, outcome_transform=Standardize(m=1))
    warm = init is not None and load_hyperparameters(model, init)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with one_thread():
        try:
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": maxiter or (WARM_MAXITER if warm else COLD_MAXITER)}})
        except Exception:  # a failed fit keeps the starting hyperparameters: still a usable model
            pass
    return model.eval()


def hyperparameters(model) -> Hyperparameters:
    """The fitted (raw) hyperparameters of ``model``, JSON-ready, for :func:`fit_gp`'s ``init``."""
    return {name: p.detach().reshape(-1).tolist() for name, p in model.named_parameters()}


def load_hyperparameters(model, values: Hyperparameters) -> bool:
    """Copy stored raw hyperparameters into ``model``; True only if every parameter had a stored,
    finite value of its shape (a model with another noise model or dimension, or after a fit that
    went wrong, starts from its prior)."""
    import math

    import torch

    params = dict(model.named_parameters())
    if set(params) != set(values) or any(len(values[k]) != p.numel() for k, p in params.items()):
        return False
    if not all(math.isfinite(v) for vs in values.values() for v in vs):
        return False
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(values[name], dtype=p.dtype).reshape(p.shape))
    return True


def marginal_log_likelihood(model) -> float:
    """The exact marginal log likelihood per observation of a fitted GP on its training data (the
    quantity the fit maximizes; for comparing fits)."""
    import torch
    from gpytorch.mlls import ExactMarginalLogLikelihood

    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    try:
        with torch.no_grad():
            out = model(*model.train_inputs)
            return float(mll(out, model.train_targets))
    finally:
        model.eval()


#: constraint values are clipped at this many standard errors above the limit (see clip_violation)
CLIP_SE = 3.0


def clip_violation(y: np.ndarray, se: np.ndarray | None) -> np.ndarray:
    """Constraint values for a GP of the constraint's edge: values more than ``CLIP_SE`` standard
    errors above the limit are clipped there. How badly a plan fails says nothing about where the
    edge is, and one catastrophic plan (accuracy at chance) would otherwise set the model's scale
    and smooth the edge away. Without standard errors the values are left as they are."""
    if se is None or not len(se) or np.isnan(se).any():
        return y
    return np.minimum(y, CLIP_SE * float(np.median(np.maximum(se, 1e-6))))


def posterior(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        post = model.posterior(torch.as_tensor(x, dtype=torch.float64))
        mean = post.mean.squeeze(-1).numpy()
        std = post.variance.clamp_min(1e-12).sqrt().squeeze(-1).numpy()
    return mean, std


def normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
