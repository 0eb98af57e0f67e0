"""The certificate: its bounds hold at their level on synthetic per-sample data with known means
(including few discordant pairs), its probability is calibrated when answers sit at the
constraint's edge, and it says how it was computed."""

import math
import statistics

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tightfit.evaluation import Accuracy, Fidelity, PerSample, Sequential
from tightfit.evaluation.certificate import (
    StatisticForm,
    betting_upper,
    certify,
    clopper_pearson_lower,
    edge_prior,
    paired01_upper,
    posterior_met,
)
from tightfit.evaluation.constraints import MaxDrop, MinMetric
from tightfit.evaluation.sequential import SequentialSession
from tightfit.evaluation.statistics import mean_estimate, z_value


def _trinomial(n: int, p_plus: float, p_minus: float, g: torch.Generator) -> torch.Tensor:
    """Paired differences original - candidate of a 0/1 metric: +1 (only the original right), -1, 0."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return (u < p_plus).double() - ((u >= p_plus) & (u < p_plus + p_minus)).double()


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p_plus, p_minus", [(0.03, 0.0), (0.04, 0.02), (0.15, 0.10)])
def test_exact_paired_bound_holds_with_few_discordant_pairs(p_plus, p_minus):
    n, reps, alpha = 50, 300, 0.05
    g = torch.Generator().manual_seed(11)
    cache: dict[tuple[int, int], float] = {}
    held = normal_held = 0
    for _ in range(reps):
        x = _trinomial(n, p_plus, p_minus, g)
        counts = (int((x > 0).sum()), int((x < 0).sum()))
        if counts not in cache:
            cache[counts] = paired01_upper(*counts, n, alpha)
        held += p_plus - p_minus <= cache[counts]
        # the plain normal bound (no variance floor) for contrast
        normal_held += p_plus - p_minus <= float(x.mean()) + z_value(2 * alpha) * float(x.std()) / math.sqrt(n)
    assert held / reps >= 0.93  # exact: >= 95% in expectation; 300 draws
    if p_minus == 0.0:  # ~1.5 discordant pairs expected: 22% of draws have none, and claim se = 0
        assert normal_held / reps < 0.90


def test_exact_paired_bound_is_not_wasteful():
    # 8 samples only the original got right, 6 only the candidate: the exact bound is within 15%
    # of the normal one's distance from the mean
    n = 100
    x = torch.tensor([1.0] * 8 + [-1.0] * 6 + [0.0] * 86, dtype=torch.float64)
    e = mean_estimate(x, prior_variance=1.0, prior_weight=2.0)
    normal = e.mean + z_value(0.1) * e.se
    exact = paired01_upper(8, 6, n, 0.05)
    assert e.mean < exact and (exact - e.mean) < 1.15 * (normal - e.mean)
    with pytest.raises(ValueError, match="do not fit"):
        paired01_upper(60, 60, 100, 0.05)


def test_clopper_pearson_lower_bound():
    assert clopper_pearson_lower(0, 20, 0.05) == 0.0
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.05 ** (1 / 20))  # all successes: alpha^(1/n)
    g = torch.Generator().manual_seed(2)
    held = sum(
        clopper_pearson_lower(int((torch.rand(40, generator=g) < 0.9).sum()), 40, 0.05) <= 0.9 for _ in range(400)
    )
    assert held / 400 >= 0.94


def test_betting_bound_holds_for_bounded_continuous_values():
    # cosine-fidelity-like differences in [-2, 2], skewed, mean known
    beta = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(8.0))
    true_mean = 2 * (2 / 10) - 1 + 0.5  # E[2 B - 1] + 0.5
    held = 0
    torch.manual_seed(5)
    for _ in range(200):
        x = 2 * beta.sample((100,)).double() - 1 + 0.5
        held += true_mean <= betting_upper(x, -2.0, 2.0, 0.05)
    assert held / 200 >= 0.95
    tight = betting_upper(torch.full((100,), 0.1, dtype=torch.float64), -2.0, 2.0, 0.05)
    assert 0.1 < tight < 0.3  # adapts to the (zero) spread of the values, not just the range


def test_bounds_follow_the_statistic_form():
    g = torch.Generator().manual_seed(0)
    stats = (_trinomial(100, 0.06, 0.05, g) - 0.02).unsqueeze(1)
    forms = {
        "paired01": StatisticForm("paired01", offset=-0.02, prior_variance=1.0),
        "bounded": StatisticForm("bounded", -1.02, 0.98, prior_variance=1.0),
        "unbounded": StatisticForm("unbounded", prior_variance=1.0),
    }
    names = {
        kind: certify(stats, [MaxDrop(0.02)], 0.95, [1.0], forms=[f]).bound_methods[0] for kind, f in forms.items()
    }
    assert names == {
        "paired01": "exact trinomial",
        "bounded": "betting (bounded)",
        "unbounded": "Student t, variance floor (approximate: no range known)",
    }
    # a statistic declared 0/1 that is not falls back to a bound that does not assume it
    odd = stats + 0.3
    assert (
        certify(odd, [MaxDrop(0.02)], 0.95, [1.0], forms=[forms["paired01"]]).bound_methods[0].startswith("Student t")
    )
    with pytest.raises(ValueError, match="kind"):
        StatisticForm("gaussian")


# --- the probability -------------------------------------------------------------------------------


def _edge_runs(step: float, runs: int, seed: int):
    """Synthetic searches that put their answer at the constraint's edge: candidates with true drops
    0, step, 2 step, ... (MaxDrop(0.02)); the answer is the most compressed one whose mean on 300
    search samples meets the constraint; 100 held-out samples then give the certificate."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(runs):
        chosen = None
        for c in range(8):
            search = _trinomial(300, 0.07 + step * c, 0.07, g) - 0.02
            if search.mean() <= 0:
                chosen = (step * c, search)
        if chosen is None:
            continue
        drop, search = chosen
        held = _trinomial(100, 0.07 + drop, 0.07, g) - 0.02
        e_s = mean_estimate(search, prior_variance=1.0, prior_weight=2.0)
        e_h = mean_estimate(held, prior_variance=1.0, prior_weight=2.0)
        met = drop - 0.02 <= 0
        out.append(
            (posterior_met(e_h.mean, e_h.se, edge_prior(e_s.mean, e_s.se)), posterior_met(e_h.mean, e_h.se, None), met)
        )
    return out


def test_probability_is_calibrated_when_answers_sit_at_the_edge():
    runs = _edge_runs(0.015, 400, seed=0)
    met = [m for _, _, m in runs]
    edge = [p for p, _, _ in runs]
    flat = [p for _, p, _ in runs]
    brier = lambda ps: statistics.mean((p - m) ** 2 for p, m in zip(ps, met))  # noqa: E731
    assert brier(edge) < brier(flat)
    # statements of >= 0.8: the flat prior's are right far less often than stated
    high_flat = [m for p, m in zip(flat, met) if p >= 0.8]
    assert statistics.mean(high_flat) < statistics.mean(p for p in flat if p >= 0.8) - 0.15
    # the edge prior's stated probability matches the frequency within 0.1 in every bin with >= 30 runs
    for lo, hi in [(0.0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01)]:
        b = [(p, m) for p, m in zip(edge, met) if lo <= p < hi]
        if len(b) >= 30:
            assert abs(statistics.mean(p for p, _ in b) - statistics.mean(m for _, m in b)) < 0.1


def test_edge_prior_and_posterior():
    assert edge_prior(-0.01, 0.02) == (0.0, 0.02)  # at the edge: centred on it, spread = the se
    assert edge_prior(-0.08, 0.02) == (0.0, 0.08)  # far inside: wide enough to reach the estimate
    assert edge_prior(0.01, 0.02) == (0.01, 0.02)  # above the edge: centred on the estimate
    assert posterior_met(-0.05, 0.02, None) == pytest.approx(0.99379, abs=1e-4)  # Phi(2.5)
    assert posterior_met(-0.05, 0.02, (0.0, 0.02)) < posterior_met(-0.05, 0.02, None)
    assert posterior_met(0.0, 0.02, (0.0, 0.02)) == pytest.approx(0.5)
    assert posterior_met(0.1, 0.0, None) == 0.0


# --- the session's certificate says how it was computed ---------------------------------------------


def _loader(n: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32)


def _models():
    torch.manual_seed(0)
    original = nn.Linear(6, 2)
    with torch.no_grad():
        original.weight.zero_()
        original.weight[1, 0], original.weight[0, 0] = 1.0, -1.0
    candidate = nn.Linear(6, 2)
    with torch.no_grad():
        candidate.weight.copy_(original.weight + 0.3 * torch.randn(2, 6))
        candidate.bias.copy_(original.bias)
    return original, candidate


def _certificate(metric, constraint):
    original, candidate = _models()
    session = SequentialSession(Sequential(certify_fraction=0.25), metric, [constraint], seed=0)
    session.baseline(original)
    session.confirm(candidate)
    return session.certify(candidate)


def test_certificate_method_for_each_metric_kind():
    loader = _loader()
    original, _ = _models()
    cases = [
        (Accuracy(loader), MaxDrop(0.05), "exact trinomial"),
        (Accuracy(loader), MinMetric(0.6), "Clopper-Pearson"),
        (
            PerSample(lambda m, b: (m(b[0]).argmax(1) == b[1]).double(), loader, binary=True),
            MaxDrop(0.05),
            "exact trinomial",
        ),
        (Fidelity(loader, original, kind="cosine"), MaxDrop(0.05), "betting (bounded)"),
        (
            Fidelity(loader, original, kind="kl"),
            MaxDrop(0.05),
            "Student t, variance floor (approximate: no range known)",
        ),
        (
            PerSample(lambda m, b: m(b[0])[:, 1], loader),
            MinMetric(0.0),
            "Student t, variance floor (approximate: no range known)",
        ),
    ]
    for metric, constraint, how in cases:
        cert = _certificate(metric, constraint)
        assert cert.samples == 20 and cert.bound_methods == (how,)
        assert how in cert.method and "edge prior" in cert.method and "20 validation samples held out" in cert.method
        assert cert.priors[0] is not None and 0.0 <= cert.probability <= 1.0
        d = cert.to_dict()
        assert d["bound_methods"] == [how] and len(d["priors"]) == 1


def test_per_sample_metric_arguments_are_checked():
    from tightfit.errors import ConfigError

    with pytest.raises(ConfigError, match="value_range"):
        PerSample(lambda m, b: b[0][:, 0], _loader(), value_range=(1.0, 0.0))
    with pytest.raises(ConfigError, match="binary"):
        PerSample(lambda m, b: b[0][:, 0], _loader(), binary="yes")
    assert PerSample(lambda m, b: b[0][:, 0], _loader(), binary=True).value_range == (0.0, 1.0)
