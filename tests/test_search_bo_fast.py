"""``bo``'s GP fits and acquisition evaluate the fitted BoTorch models with plain torch operations
(``gp.exact_mll_closure``, ``gp.FastPosterior``): the values and gradients must be BoTorch's, and
a fit must reach the likelihood BoTorch's own closure reaches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tightfit.search import gp as G


def _data(n: int, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, d))
    y = np.sin(5 * x[:, 0]) + x[:, 1] ** 2 - 0.5 * x[:, 2] + 0.05 * rng.normal(size=n)
    return x, y


@pytest.mark.parametrize("se", [None, 0.05], ids=["learned-noise", "fixed-noise"])
def test_fast_posterior_equals_botorchs(se):
    x, y = _data(25)
    model = G.fit_gp(x, y, None if se is None else np.full(25, se))
    assert G.FastPosterior.supports(model)
    fast = G.FastPosterior(model)
    X = torch.rand(40, 4, dtype=torch.float64, requires_grad=True)
    post = model.posterior(X)
    mean, var = fast(X)
    assert torch.allclose(mean, post.mean.squeeze(-1), rtol=0, atol=1e-10)
    assert torch.allclose(var, post.variance.squeeze(-1), rtol=0, atol=1e-10)
    # gradients in X too (the acquisition optimizer follows them)
    (g_fast,) = torch.autograd.grad((mean + var.sqrt()).sum(), X)
    (g_ref,) = torch.autograd.grad((post.mean + post.variance.sqrt()).sum(), X)
    assert torch.allclose(g_fast, g_ref, rtol=0, atol=1e-8)
    # a batch of q=1 candidates, as optimize_acqf passes them
    m3, v3 = fast(X.detach()[:, None, :].squeeze(-2))
    assert m3.shape == (40,) and v3.shape == (40,)
    # gp.posterior (used by the final pick, levelset, bo's centre) takes the same path
    m_np, s_np = G.posterior(model, x[:5])
    with torch.no_grad():
        ref = model.posterior(torch.as_tensor(x[:5]))
    np.testing.assert_allclose(m_np, ref.mean.squeeze(-1).numpy(), atol=1e-10)
    np.testing.assert_allclose(s_np, ref.variance.clamp_min(1e-12).sqrt().squeeze(-1).numpy(), atol=1e-10)


@pytest.mark.parametrize("se", [None, 0.05], ids=["learned-noise", "fixed-noise"])
def test_mll_closure_equals_botorchs(se):
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.optim.closures import get_loss_closure_with_grads
    from gpytorch.mlls import ExactMarginalLogLikelihood

    x, y = _data(20)
    yvar = None if se is None else torch.full((20, 1), se**2, dtype=torch.float64)
    model = SingleTaskGP(
        torch.as_tensor(x), torch.as_tensor(y).reshape(-1, 1), train_Yvar=yvar, outcome_transform=Standardize(m=1)
    )
    mll = ExactMarginalLogLikelihood(model.likelihood, model).train()
    with torch.no_grad():  # away from the defaults, where terms could vanish
        model.covar_module.raw_lengthscale.add_(torch.linspace(0.1, 0.9, 4))
        model.mean_module.raw_constant.add_(0.3)
    ours = G.exact_mll_closure(mll)
    assert ours is not None
    value, grads = ours()
    grads = [g.clone() for g in grads]  # the closure hands back the parameters' .grad tensors
    ref_value, ref_grads = get_loss_closure_with_grads(mll, parameters=ours.parameters)()
    assert float(value) == pytest.approx(float(ref_value), abs=1e-10)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_fit_reaches_botorchs_likelihood(monkeypatch):
    """Fitting with the fast closure reaches (at least) the likelihood BoTorch's closure reaches,
    cold and warm-started, on a synthetic problem."""
    x, y = _data(30, seed=3)
    se = np.full(30, 0.05)
    ours = [G.marginal_log_likelihood(G.fit_gp(x, y)), G.marginal_log_likelihood(G.fit_gp(x, y, se))]
    warm_init = G.hyperparameters(G.fit_gp(x[:29], y[:29]))
    ours.append(G.marginal_log_likelihood(G.fit_gp(x, y, init=warm_init)))
    monkeypatch.setattr(G, "exact_mll_closure", lambda mll: None)  # BoTorch's own closure
    theirs = [G.marginal_log_likelihood(G.fit_gp(x, y)), G.marginal_log_likelihood(G.fit_gp(x, y, se))]
    theirs.append(G.marginal_log_likelihood(G.fit_gp(x, y, init=warm_init)))
    for a, b in zip(ours, theirs):
        assert a >= b - 1e-6, (ours, theirs)


def test_unsupported_models_fall_back_to_botorch():
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.input import Normalize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    x, y = _data(10)
    model = SingleTaskGP(torch.as_tensor(x), torch.as_tensor(y).reshape(-1, 1), input_transform=Normalize(d=4))
    assert not G.FastPosterior.supports(model)
    assert G.exact_mll_closure(ExactMarginalLogLikelihood(model.likelihood, model)) is None
    mean, std = G.posterior(model.eval(), x[:3])  # BoTorch's path
    assert mean.shape == (3,) and (std > 0).all()
