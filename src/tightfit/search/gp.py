"""Small GP helpers on BoTorch (imported lazily: BoTorch is slow to import)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

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

#: L-BFGS stops when an iteration improves the loss (minus the log likelihood per observation) by
#: less than this relative amount. scipy's default, 2.2e-9, took a quarter more time on the
#: replayed digits search for likelihoods within 1e-5 per observation (median) of this one's; 1e-6
#: saved more but stopped a warm-started fit 0.007 per observation short (tests)
FIT_FTOL = 1e-7

#: JSON-ready hyperparameters of a fitted GP: raw parameter name -> flat list of floats
Hyperparameters = dict[str, list[float]]


def fit_gp(
    x: np.ndarray,
    y: np.ndarray,
    se: np.ndarray | None = None,
    *,
    init: Hyperparameters | None = None,
    maxiter: int | None = None,
) -> Any:  # botorch's SingleTaskGP
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
    # a failed fit keeps the starting hyperparameters: still a usable model
    with one_thread(), suppress(Exception):
        fit_gpytorch_mll(
            mll,
            closure=exact_mll_closure(mll),  # None: BoTorch's own
            optimizer_kwargs={
                "options": {"maxiter": maxiter or (WARM_MAXITER if warm else COLD_MAXITER), "ftol": FIT_FTOL}
            },
        )
    return model.eval()


def hyperparameters(model: Any) -> Hyperparameters:
    """The fitted (raw) hyperparameters of ``model``, JSON-ready, for :func:`fit_gp`'s ``init``."""
    return {name: p.detach().reshape(-1).tolist() for name, p in model.named_parameters()}


def load_hyperparameters(model: Any, values: Hyperparameters) -> bool:
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


def marginal_log_likelihood(model: Any) -> float:
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
    level = clip_level(se)
    return y if level is None else np.minimum(y, level)


def clip_level(se: np.ndarray | None) -> float | None:
    """``CLIP_SE`` standard errors (the median of ``se``): how far over the limit a constraint value
    is beyond noise; None without standard errors."""
    if se is None or not len(se) or np.isnan(se).any():
        return None
    return CLIP_SE * float(np.median(np.maximum(se, 1e-6)))


def posterior(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    X = torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        if FastPosterior.supports(model):
            mean, var = FastPosterior(model)(X)
        else:
            post = model.posterior(X)
            mean, var = post.mean.squeeze(-1), post.variance.squeeze(-1)
    return mean.numpy(), var.clamp_min(1e-12).sqrt().numpy()


def normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


class FastPosterior:
    """Posterior mean and standard deviation of a fitted single-output ``SingleTaskGP`` (as
    :func:`fit_gp` builds it: no input transform, ``Standardize`` outcome transform), computed from
    the model's own kernel, mean, noise and training data with one Cholesky factor made up front.

    Same values as ``model.posterior(X)`` (tested to 1e-9), differentiable in ``X``; BoTorch's
    path builds GPyTorch's lazy kernel tensors, a multivariate normal and a posterior object on
    every call, about 2 ms of Python per evaluation at tens of points, which was most of an
    acquisition optimization's time (docs/search.md)."""

    def __init__(self, model: Any) -> None:
        import torch
        from linear_operator.utils.cholesky import psd_safe_cholesky

        model.eval()
        self.model = model
        self.train_x = model.train_inputs[0]
        with torch.no_grad():
            k = model.covar_module.forward(self.train_x, self.train_x)
            noise = model.likelihood.noise.reshape(-1)
            k = k + torch.diag_embed(noise.expand(k.shape[-1]))
            self.chol = psd_safe_cholesky(k)
            resid = (model.train_targets - model.mean_module.constant).unsqueeze(-1)
            self.alpha = torch.cholesky_solve(resid, self.chol).squeeze(-1)
        transform = model.outcome_transform
        self.y_mean = transform.means.reshape(())
        self.y_std = transform.stdvs.reshape(())

    @staticmethod
    def supports(model: Any) -> bool:
        from botorch.models import SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from gpytorch.means import ConstantMean

        return (
            type(model) is SingleTaskGP
            and type(model.mean_module) is ConstantMean  # (its forward's shape checks cost more than the sum)
            and getattr(model, "input_transform", None) is None
            and isinstance(getattr(model, "outcome_transform", None), Standardize)
            and model.num_outputs == 1
            and len(model.train_inputs[0].shape) == 2  # not batched
        )

    def __call__(self, X):
        """``X`` (``... x d``) -> mean and variance (``...``), in the original outcome scale."""
        import torch

        gp = self.model
        k = gp.covar_module.forward(X, self.train_x)  # ... x n
        mean = gp.mean_module.constant + k @ self.alpha
        v = torch.linalg.solve_triangular(self.chol, k.unsqueeze(-1), upper=False).squeeze(-1)
        prior = gp.covar_module.forward(X, X, diag=True)
        var = prior - (v * v).sum(-1)
        return mean * self.y_std + self.y_mean, var * self.y_std**2


def exact_mll_closure(mll):
    """A forward-backward closure for BoTorch's fitting routines (``fit_gpytorch_mll(closure=)``)
    that computes the same loss as BoTorch's default one for a :func:`fit_gp` model — minus
    GPyTorch's exact marginal log likelihood per observation, priors included — with plain torch
    operations on the model's own kernel, mean and likelihood: GPyTorch's path builds lazy
    tensors and distributions on each of the ~30 evaluations of a fit, most of its time at these
    sizes. None for a model this does not cover (BoTorch's closure is used then)."""
    import torch
    from botorch.optim.closures import ForwardBackwardClosure
    from botorch.optim.utils import get_parameters_and_bounds
    from gpytorch.likelihoods import FixedNoiseGaussianLikelihood, GaussianLikelihood
    from gpytorch.settings import max_cholesky_size
    from linear_operator.utils.cholesky import psd_safe_cholesky

    model = mll.model
    likelihood = model.likelihood
    if not (
        FastPosterior.supports(model)
        and type(likelihood) in (GaussianLikelihood, FixedNoiseGaussianLikelihood)
        and getattr(likelihood, "second_noise_covar", None) is None  # no noise learned on top of the fixed one
        and not list(model.added_loss_terms())
        and len(model.train_targets) <= max_cholesky_size.value()  # GPyTorch switches to CG above
    ):
        return None
    X, y = model.train_inputs[0], model.train_targets
    n = len(y)

    def forward() -> torch.Tensor:
        covar = model.covar_module.forward(X, X) + torch.diag_embed(likelihood.noise.reshape(-1).expand(n))
        chol = psd_safe_cholesky(covar)
        resid = (y - model.mean_module.constant).unsqueeze(-1)
        alpha = torch.cholesky_solve(resid, chol)
        value = -0.5 * (resid * alpha).sum() - chol.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
        for _, module, prior, closure, _ in model.named_priors():  # as ExactMarginalLogLikelihood adds them
            value = value + _log_prior(prior, closure(module)).sum()
        return -value / n

    parameters = {name: p for name, p in get_parameters_and_bounds(mll)[0].items() if p.requires_grad}
    return ForwardBackwardClosure(forward=forward, parameters=parameters)


def _log_prior(prior, x):
    """``prior.log_prob(x)``; for GPyTorch's ``LogNormalPrior`` (BoTorch's default priors) written
    out, without torch.distributions' argument checks and transform objects (a third of a fit
    evaluation's time)."""
    from gpytorch.priors import LogNormalPrior

    if type(prior) is not LogNormalPrior:
        return prior.log_prob(x)
    log_x = x.log()  # torch's Normal.log_prob of log(x), minus the log-Jacobian log(x), term by term
    var = prior.scale**2
    return -((log_x - prior.loc) ** 2) / (2 * var) - prior.scale.log() - math.log(math.sqrt(2 * math.pi)) - log_x
