"""Cheap, certified evaluation: per-sample metrics, the sequential test, paired subsampling, the
noise handed to the search, fidelity levels and the accounting."""

import copy
import math

import optuna
import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import ConfigError
from tightfit.evaluation import Agreement, Fidelity, PerSample, Sequential, mean_estimate, u_statistic2
from tightfit.evaluation.certificate import PRIOR_WEIGHT
from tightfit.evaluation.constraints import MaxDrop, MaxSize, MinMetric
from tightfit.evaluation.sequential import (
    FEASIBLE,
    INFEASIBLE,
    UNDECIDED,
    SequentialSession,
    certify,
    look_schedule,
    sequential_test,
)
from tightfit.operators import Compose, Prune, Quantize

# --- statistics ---------------------------------------------------------------------------------


def test_mean_estimate_and_finite_population():
    x = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    e = mean_estimate(x)
    assert e.mean == pytest.approx(0.6)
    assert e.se == pytest.approx(math.sqrt(0.3 / 5))
    assert mean_estimate(x, population=5).se == 0.0  # the whole population: exact
    # all-equal values on a tiny sample do not claim certainty once shrunk towards the max variance
    assert mean_estimate(torch.zeros(10), prior_variance=1.0, prior_weight=2.0).se > 0.05


def test_order_two_u_statistic_is_the_unbiased_variance():
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64)
    e = u_statistic2(x, lambda a, b: (a - b) ** 2 / 2)
    assert e.mean == pytest.approx(float(x.var(unbiased=True)), rel=1e-9)
    assert 0 < e.se < 0.5


def test_look_schedule():
    assert look_schedule(270, 32, 2.0) == [32, 64, 128, 256, 270]
    assert look_schedule(20, 32, 2.0) == [20]


# --- the sequential test on synthetic per-sample data with known means ----------------------------


def _population(mean_drop: float, n: int, seed: int) -> torch.Tensor:
    """Per-sample paired differences in {-1, 0, 1} with a known mean, like accuracy drops."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    p_worse = 0.03 + max(mean_drop, 0)
    p_better = 0.03 + max(-mean_drop, 0)
    return (u < p_worse).double() - ((u >= p_worse) & (u < p_worse + p_better)).double()


def _run(diffs: torch.Tensor, max_drop: float, confidence: float = 0.95, **futility):
    z = diffs - max_drop
    looks = look_schedule(len(z), 32, 2.0)
    return sequential_test(lambda a, b: z[a:b], looks, confidence=confidence, prior_variances=[1.0], **futility)


def test_clearly_infeasible_is_rejected_at_the_first_look():
    d = _population(0.5, 1000, 0)
    decision = _run(d, 0.01)
    assert decision.verdict == INFEASIBLE and decision.samples == 32 and len(decision.looks) == 1


def test_clearly_feasible_is_accepted_early():
    d = _population(-0.4, 1000, 1)
    decision = _run(d, 0.05)
    assert decision.verdict == FEASIBLE and decision.samples < 1000


def test_borderline_reads_everything_and_matches_full_evaluation():
    for seed in range(5):
        d = _population(0.01, 400, seed)
        decision = _run(d, 0.01)
        full = float(d.mean()) - 0.01
        if decision.samples == 400:
            assert decision.verdict == (FEASIBLE if full <= 0 else INFEASIBLE)
            assert decision.estimates[0].se == 0.0 and decision.estimates[0].mean == pytest.approx(full)


@pytest.mark.parametrize("true_drop,max_drop", [(0.06, 0.03), (0.0, 0.03)])
def test_early_decisions_are_wrong_less_often_than_allowed(true_drop, max_drop):
    # Many random orders of one finite population whose mean is on one side of the constraint:
    # an early decision for the other side is an error; the test allows 1 - confidence of them.
    population = _population(true_drop, 1000, 7)
    truth_met = float(population.mean()) <= max_drop
    wrong = 0
    for seed in range(300):
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
        decision = _run(population[order], max_drop, confidence=0.9)
        wrong += (decision.verdict == FEASIBLE) != truth_met
    assert wrong / 300 <= 0.10


def _orders(population: torch.Tensor, runs: int):
    for seed in range(runs):
        yield population[torch.randperm(len(population), generator=torch.Generator().manual_seed(seed))]


def test_futility_rejects_near_edge_plans_earlier_and_never_accepts():
    # 0.029 over the limit: the Bonferroni test reads 912 samples on the mean over these orders to
    # reject it, the futility boundary (probability of meeting it below 0.1) 515
    over = _population(0.05, 4000, 3)
    plain = [_run(d, 0.03) for d in _orders(over, 40)]
    futile = [_run(d, 0.03, futility=0.1, futility_samples=256) for d in _orders(over, 40)]
    assert all(d.verdict == INFEASIBLE for d in plain + futile)
    assert sum(d.samples for d in futile) < 0.7 * sum(d.samples for d in plain)
    assert any(d.futile for d in futile) and not any(d.futile for d in plain)
    assert all(d.samples >= 256 for d in futile if d.futile)
    # a feasible plan's acceptance is the test's own: same look, same verdict, or a futility stop
    under = _population(0.0, 4000, 4)
    for d in _orders(under, 40):
        with_f, without = _run(d, 0.03, futility=0.1, futility_samples=256), _run(d, 0.03)
        assert with_f == without or (with_f.futile and with_f.samples <= without.samples)


def test_futility_rejects_a_feasible_plan_seldom():
    # at the edge's feasible side (0.005 under the limit), the stops that err stay near the level
    # per look (three looks from 512 on; 6.3% of these 300 orders, 0.7% without the boundary)
    population = _population(0.025, 4000, 5)
    assert float(population.mean()) <= 0.03
    orders = list(_orders(population, 300))
    rejected = sum(_run(d, 0.03, futility=0.1, futility_samples=512).verdict == INFEASIBLE for d in orders)
    assert rejected / 300 <= 0.12


def test_certificate_on_known_data():
    stats = (_population(0.0, 400, 3) - 0.05).unsqueeze(1)  # drop ~0 vs MaxDrop(0.05): surely met
    cert = certify(stats, [MaxDrop(0.05)], 0.95, [1.0])
    assert cert.certified and cert.probability > 0.95 and cert.samples == 400
    bad = (_population(0.2, 400, 3) - 0.05).unsqueeze(1)
    cert = certify(bad, [MaxDrop(0.05)], 0.95, [1.0])
    assert not cert.certified and cert.probability < 0.05 and "held out" in cert.method


# --- per-sample metrics ---------------------------------------------------------------------------


def test_per_sample_metrics_index_and_count(trained_mlp, digits):
    acc = tightfit.Accuracy(digits.loader("val", 64))
    full = acc.per_sample(trained_mlp)
    assert acc.samples_evaluated == len(digits.y_val) == acc.num_samples
    idx = torch.tensor([5, 0, 100, 7])
    assert torch.equal(acc.per_sample(trained_mlp, idx), full[idx])
    assert acc.samples_evaluated == len(digits.y_val) + 4
    assert acc(trained_mlp) == pytest.approx(float(full.mean()))
    # a plain list of batches (not a DataLoader) works the same way
    batches = [(digits.x_val[i : i + 50], digits.y_val[i : i + 50]) for i in range(0, len(digits.y_val), 50)]
    assert torch.equal(tightfit.Accuracy(batches).per_sample(trained_mlp, idx), full[idx])


def test_agreement_and_fidelity_compare_with_the_original(trained_mlp, digits):
    inputs_only = [digits.x_val[i : i + 100] for i in range(0, len(digits.y_val), 100)]  # no labels needed
    agree = Agreement(inputs_only, reference=trained_mlp)
    assert agree(trained_mlp) == 1.0
    cosine = Fidelity(inputs_only, reference=trained_mlp)
    assert cosine(trained_mlp) == pytest.approx(1.0)
    kl = Fidelity(digits.loader("val", 128), reference=trained_mlp, kind="kl")
    assert kl(trained_mlp) == pytest.approx(0.0, abs=1e-9)
    pruned = tightfit.apply(_plan(trained_mlp, 0.95), trained_mlp)
    assert agree(pruned) < 1.0 and cosine(pruned) < 0.999 and kl(pruned) < 0
    with pytest.raises(ConfigError, match="reference"):
        Agreement(inputs_only)(trained_mlp)
    with pytest.raises(ConfigError, match="kind"):
        Fidelity(inputs_only, kind="l2")


def _plan(model, sparsity):
    from tightfit.search.space import build_space

    space = build_space(Compose([Prune()]), tightfit.analyze(model))
    return space.plan({d.key: sparsity for d in space.dimensions})


class _Table:
    """A fake per-sample metric: model.values[i] is the value on sample i; records requested indices."""

    value_range = (0.0, 1.0)

    def __init__(self, n):
        self.num_samples = n
        self.samples_evaluated = 0
        self.requests = []

    def per_sample(self, model, indices=None):
        idx = torch.arange(self.num_samples) if indices is None else torch.as_tensor(indices)
        self.requests.append((model.name, idx.clone()))
        self.samples_evaluated += len(idx)
        return model.values[idx]


class _Fixed(nn.Module):
    def __init__(self, name, values):
        super().__init__()
        self.name, self.values = name, values


def test_futility_applies_to_full_evaluations_only():
    # a candidate 0.03 under the original's accuracy against MaxDrop(0.01): the futility boundary
    # stops its full evaluation early (256 samples, against 512); a screen (one look) and a probe
    # (which ranks layers by its estimate) read as before
    n = 4000
    values = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.9).double()
    original, worse = _Fixed("original", values), _Fixed("worse", values.clone())
    worse.values[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:120]] = 0.0
    samples = {}
    for futility in (0.0, 0.2):
        config = Sequential(futility=futility, futility_samples=256, probe_samples=None)  # probes read on
        session = SequentialSession(config, _Table(n), [MaxDrop(0.01)], 0)
        session.baseline(original)
        samples[futility] = {level: session.evaluate(worse, level=level) for level in ("full", "screen", "probe")}
    full, plain = samples[0.2]["full"], samples[0.0]["full"]
    assert full.decision.futile and full.decision.verdict == INFEASIBLE and 256 <= full.samples < plain.samples
    assert not plain.decision.futile
    for level in ("screen", "probe"):
        assert samples[0.2][level].samples == samples[0.0][level].samples
        assert not samples[0.2][level].decision.futile


def test_paired_subsampling_same_order_for_every_candidate():
    n = 400
    base = 1.0 - _population(0.0, n, 11).abs()  # 0/1 values, mostly 1 (an accurate original)
    metric = _Table(n)
    session = SequentialSession(Sequential(first_look=20, certify_fraction=0.25), metric, [MaxDrop(0.02)], seed=3)
    session.baseline(_Fixed("original", base))
    a = session.evaluate(_Fixed("a", base.clone()), level="full")  # identical to the original
    worse = base.clone()
    worse[session.search_idx[:150]] = 0.0  # drop on the first 150 samples of the order
    b = session.evaluate(_Fixed("b", worse), level="full")
    (_, ia), (_, ib) = metric.requests[1], metric.requests[1 + len(a.decision.looks)]
    assert torch.equal(ia, ib) and torch.equal(ia, session.search_idx[: len(ia)])  # same samples, same order
    # the certification samples are disjoint from the search samples
    assert not set(session.search_idx.tolist()) & set(session.certify_idx.tolist())
    assert len(session.certify_idx) == 100
    # identical candidate: paired differences are exactly zero
    assert a.constraint_values[0] == pytest.approx(-0.02) and a.metric == pytest.approx(float(base.mean()))
    assert b.decision.verdict == INFEASIBLE and b.samples == 20
    # a second session with the same seed orders the samples identically (resume == uninterrupted)
    again = SequentialSession(Sequential(first_look=20), _Table(n), [MaxDrop(0.02)], seed=3)
    assert torch.equal(again.order, session.order)


def test_sequential_needs_a_per_sample_metric_and_valid_settings():
    with pytest.raises(ConfigError, match="per-sample"):
        SequentialSession(Sequential(), lambda m: 1.0, [MaxDrop(0.01)], seed=0)
    with pytest.raises(ConfigError, match="confidence"):
        Sequential(confidence=1.5)
    with pytest.raises(ConfigError, match="certify_fraction"):
        Sequential(certify_fraction=0.95)
    with pytest.raises(ConfigError, match="futility"):
        Sequential(futility=0.5)
    with pytest.raises(ConfigError, match="futility_samples"):
        Sequential(futility_samples=1)


def test_min_metric_and_size_constraints_split():
    from tightfit.evaluation.sequential import per_sample_constraints

    assert per_sample_constraints([MaxDrop(0.01), MaxSize(100), MinMetric(0.9)]) == ([0, 2], [1], [])


# --- end to end: noise to the search, fidelity levels, accounting ---------------------------------


def _compress(mlp, digits, **overrides):
    evaluate = tightfit.Accuracy(digits.loader("val", 512))
    args = dict(
        evaluate=evaluate,
        strategy=Compose([Prune(sparsity=(0.0, 0.95)), Quantize(bits=(2, 4, 8))]),
        constraint=tightfit.MaxDrop(0.02),
        finetune=tightfit.FineTune(digits.loader("train", shuffle=True), epochs=1, lr=1e-3),
        budget=6,
        search="tpe",
        seed=0,
        evaluation=Sequential(first_look=24),
    )
    args.update(overrides)
    return tightfit.compress(mlp, **args), evaluate


def test_cheap_search_records_noise_levels_and_accounting(mlp, digits, tmp_path):
    result, evaluate = _compress(mlp, digits, run_dir=tmp_path / "run")
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    frozen = study.get_trials()
    assert len(frozen) == 6
    # the noise of every estimate reaches the search as a trial attribute
    for t in frozen:
        assert t.user_attrs["metric_se"] > 0 and math.isfinite(t.user_attrs["metric_se"])
        assert t.user_attrs["fidelity"] in ("full", "screen", "stopped")
    levels = {t.user_attrs["fidelity"] for t in frozen}
    assert "full" in levels
    for t in frozen:
        if t.user_attrs["fidelity"] == "screen" and t.user_attrs["screen_prediction"] is None:
            # screened before the stages are calibrated: pruned, no fine-tune, first look only
            assert t.state == optuna.trial.TrialState.PRUNED
            assert t.user_attrs["finetune_steps"] == 0 and t.user_attrs["val_samples"] == 24
        elif t.user_attrs["fidelity"] == "screen":  # calibrated: told with a predicted value
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.user_attrs["finetune_steps"] == 0 and t.user_attrs["val_samples"] == 24
        else:
            assert t.user_attrs["finetune_steps"] > 0 and t.user_attrs["val_samples"] >= 24
        evaluations = t.user_attrs["evaluations"]  # stages of the fine-tune, then the evaluation
        assert sum(e.get("val_samples", 0) for e in evaluations) == t.user_attrs["val_samples"]
        assert sum(e.get("finetune_steps") or 0 for e in evaluations) == t.user_attrs["finetune_steps"]
        assert all(e["seconds"] > 0 for e in evaluations)
    # a screened candidate's feasibility is at most predicted: never counted as a feasible trial
    assert not any(t.feasible for t in result.trials if t.fidelity == "screen")
    # accounting: every forward pass the metric made is attributed to the baseline, a trial or the end
    acc = result.accounting
    assert acc["val_samples"] == evaluate.samples_evaluated
    assert acc["val_samples_baseline"] == len(digits.y_val)
    assert acc["val_samples_probes"] == sum(t.user_attrs.get("probe_samples") or 0 for t in frozen)
    assert acc["val_samples_trials"] == sum(t.user_attrs["val_samples"] for t in frozen)
    assert acc["finetune_steps"] == sum(t.user_attrs["finetune_steps"] for t in frozen)
    assert acc["trial_wall_s"] == pytest.approx(sum(t.user_attrs["duration_s"] for t in frozen))
    full_cost = len(digits.y_val) * (6 + 2)
    assert acc["val_samples"] < full_cost
    # the answer: chosen among fully fine-tuned candidates, confirmed on the full set, certified
    if result.feasible:
        assert result.best_trial.fidelity == "full"
        assert result.metric == tightfit.Accuracy(digits.loader("val", 512))(result.model)
        cert = result.certificate
        assert cert is not None and 0 <= cert.probability <= 1 and cert.samples == round(0.25 * len(digits.y_val))
        assert acc["val_samples_final"] == len(digits.y_val)  # the certificate reuses the confirmation's values
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"accounting"' in summary and '"certificate"' in summary


def test_full_evaluation_also_accounts_and_reports_noise(mlp, digits):
    result, evaluate = _compress(mlp, digits, evaluation=None, budget=2)
    assert all(t.fidelity == "full" and t.val_samples == len(digits.y_val) for t in result.trials)
    assert all(t.metric_se is not None and t.metric_se > 0 for t in result.trials)
    assert result.accounting["val_samples"] == evaluate.samples_evaluated
    assert result.certificate is None


def test_evaluation_argument_is_checked(mlp, digits):
    with pytest.raises(ConfigError, match="evaluation"):
        _compress(mlp, digits, evaluation="fast")
    with pytest.raises(ConfigError, match="per-sample"):
        _compress(mlp, digits, evaluate=lambda m: 1.0)
    with pytest.raises(ConfigError, match="latency"):
        _compress(mlp, digits, objective="latency", example_input=digits.x_val[:1])


def test_per_sample_user_metric(mlp, digits):
    def margin(model, batch):
        x, y = batch
        logits = model(x)
        return logits.gather(1, y[:, None]).squeeze(1) - logits.max(dim=1).values

    metric = PerSample(margin, digits.loader("val", 128))
    values = metric.per_sample(mlp)
    assert values.shape == (len(digits.y_val),) and (values <= 0).all()


def test_progress_shows_the_cost_live():
    from tightfit.records import Measurement
    from tightfit.report.progress import _Progress

    study = optuna.create_study()
    progress = _Progress(3, Measurement(0.9, 1000, 10, 10), None)
    for samples, steps, level in [(32, 0, "screen"), (256, 100, "full")]:
        trial = study.ask()
        for key, value in {"val_samples": samples, "finetune_steps": steps, "fidelity": level}.items():
            trial.set_user_attr(key, value)
        progress.on_trial(study.tell(trial, 1.0))
    assert (progress.val_samples, progress.finetune_steps, progress.screened) == (288, 100, 1)
    assert "val fwd: 288" in progress._cost() and "ft steps: 100" in progress._cost()


def test_config_section_maps_onto_sequential():
    from tightfit.cli.config import EvaluationSection, _evaluation

    made = _evaluation(EvaluationSection(confidence=0.9, first_look=16, futility=0.2, trial_samples=1024))
    assert isinstance(made, Sequential) and made.confidence == 0.9 and made.first_look == 16
    assert made.futility == 0.2 and made.futility_samples == 512
    assert made.trial_samples == 1024 and made.verify_top == 3
    assert EvaluationSection().futility == Sequential().futility  # one default
    assert EvaluationSection().trial_samples == Sequential().trial_samples
    assert _evaluation(EvaluationSection(method="full")) is None and _evaluation(None) is None
    with pytest.raises(ConfigError, match=r"\[evaluation\].*confidence"):
        _evaluation(EvaluationSection(confidence=2.0))


@pytest.mark.parametrize("min_improvement", [0.0, 0.9])
def test_only_candidates_that_improve_enough_are_promoted(mlp, digits, min_improvement):
    """A candidate is fine-tuned only when its objective is at least ``min_improvement`` below the
    best feasible trial's so far; any other is screened."""
    result, _ = _compress(
        mlp,
        digits,
        budget=8,
        search="random",
        seed=2,
        evaluation=Sequential(first_look=24, min_improvement=min_improvement),
    )
    best = None  # the best feasible objective before each trial
    for t in sorted(result.trials, key=lambda t: t.number):
        enough = best is None or t.objective < best * (1 - min_improvement)
        assert (t.fidelity == "screen") == (not enough), (t.number, t.objective, best)
        if t.fidelity == "full" and t.feasible:
            best = t.objective if best is None else min(best, t.objective)
    if min_improvement == 0.9:  # nothing random is 10x smaller than the first feasible answer
        first = next(t.number for t in result.trials if t.fidelity == "full" and t.feasible)
        assert all(t.fidelity == "screen" for t in result.trials if t.number > first)


@pytest.mark.slow
def test_promotion_follows_the_incumbent_bo_works_from(mlp, digits, tmp_path):
    """``bo`` states the objective of the answer it works from (its credible best) with each BO
    suggestion; cheap evaluation promotes exactly the candidates that improve on it."""
    from tightfit.search.base import INCUMBENT_ATTR

    _compress(
        mlp,
        digits,
        budget=9,
        search="bo",
        seed=1,
        run_dir=tmp_path / "run",
        evaluation=Sequential(first_look=24, min_improvement=0.0),
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    stated = [t for t in study.get_trials() if INCUMBENT_ATTR in t.system_attrs]
    assert stated, "bo's model-based steps state their incumbent"
    for t in stated:
        size = t.user_attrs["measurement"]["size_bytes"]  # the objective (screens told as PRUNED have no values)
        improves = size < t.system_attrs[INCUMBENT_ATTR]
        assert (t.user_attrs["fidelity"] != "screen") == improves, (t.number, size, t.system_attrs[INCUMBENT_ATTR])


def test_agreement_on_per_token_outputs_says_what_to_use_instead():
    # a language model's (batch, tokens, vocab) scores gave "96 values for a batch of 8 samples"
    from tightfit.errors import EvaluationError

    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    ids = [torch.randint(0, 10, (8, 12))]
    with pytest.raises(EvaluationError, match=r"shape \(8, 12, 10\).*tightfit.Fidelity"):
        Agreement(ids, reference=lm)(lm)
    with pytest.raises(EvaluationError, match=r"Accuracy compares .* shape \(8, 12, 10\)"):
        tightfit.Accuracy([(ids[0], ids[0])])(lm)
    assert Fidelity(ids, reference=lm)(lm) == pytest.approx(1.0)


class _Seq2Seq(torch.nn.Module):
    """Like a Hugging Face encoder-decoder: the decoder's inputs are built from ``labels``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, input_ids, labels=None):
        if labels is None:
            raise ValueError("You must specify exactly one of decoder_input_ids or labels")
        return {"logits": self.head(self.embed(input_ids).mean(1, keepdim=True) + self.embed(labels))}


def test_label_free_metrics_keep_the_labels_a_forward_takes():
    # Fidelity dropped `labels` from the batch and a T5 model failed in the baseline measurement
    torch.manual_seed(0)
    model = _Seq2Seq()
    batches = [{"input_ids": torch.randint(0, 10, (4, 6)), "labels": torch.randint(0, 10, (4, 5))}]
    assert Fidelity(batches, reference=model)(model) == pytest.approx(1.0)
    assert Fidelity(batches, reference=model, kind="kl")(model) == pytest.approx(0.0, abs=1e-9)


class _Encoder(torch.nn.Module):
    """Like a Hugging Face base model (BertModel, Wav2Vec2Model, BartModel): hidden states, no logits."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.mix = torch.nn.Linear(4, 4)

    def forward(self, input_ids):
        hidden = self.mix(self.embed(input_ids))
        return {"last_hidden_state": hidden, "pooler_output": hidden.mean(1)}


def test_cosine_fidelity_compares_a_base_models_hidden_states():
    # Wav2Vec2Model and BartModel outputs stopped every metric with "Cannot read class scores"
    from tightfit.errors import EvaluationError

    torch.manual_seed(0)
    model = _Encoder()
    ids = [torch.randint(0, 10, (8, 6))]
    assert Fidelity(ids, reference=model)(model) == pytest.approx(1.0)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.mix.weight.mul_(-1.0)
        changed.mix.bias.zero_()
    assert Fidelity(ids, reference=model)(changed) < 0.5  # the hidden states are what it compares
    with pytest.raises(EvaluationError, match="class scores"):  # class scores are still what these read
        Fidelity(ids, reference=model, kind="kl")(model)
    with pytest.raises(EvaluationError, match="class scores"):
        Agreement(ids, reference=model)(model)
    from tightfit.calling import compared_output

    both = {"last_hidden_state": torch.zeros(2, 4, 5), "logits": torch.ones(2, 3)}
    assert compared_output(both) is both["logits"]  # class scores first, wherever they are


def test_fidelity_kl_is_per_position_over_the_class_axis():
    # a language model's (batch, tokens, vocab) logits: one softmax per token, not one over all of them
    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    other = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    ids = torch.randint(0, 10, (8, 12))
    kl = Fidelity([ids], reference=lm, kind="kl", class_dim=-1)
    assert kl(lm) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        log_p, log_q = torch.log_softmax(lm(ids).double(), -1), torch.log_softmax(other(ids).double(), -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (8, 12)
    assert kl(other) == pytest.approx(-float(per_token.mean()), rel=1e-9)
    # (batch, classes) outputs: the default axis 1 is the same as before
    mlp = torch.nn.Linear(5, 3)
    x = torch.randn(6, 5)
    with torch.no_grad():
        p, q = torch.log_softmax(mlp(x).double(), 1), torch.log_softmax(torch.zeros(6, 3, dtype=torch.float64), 1)
    zero = torch.nn.Linear(5, 3)
    torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
    assert Fidelity([x], reference=mlp, kind="kl")(zero) == pytest.approx(
        -float((p.exp() * (p - q)).sum(1).mean()), rel=1e-9
    )
    from tightfit.errors import ConfigError

    with pytest.raises(ConfigError, match="class_dim"):
        Fidelity([ids], reference=lm, kind="kl", class_dim=0)
    with pytest.raises(ConfigError, match=r"class_dim.*shape \(8, 12, 10\)"):
        Fidelity([ids], reference=lm, kind="kl", class_dim=3)(lm)


def test_a_binary_model_with_one_score_needs_a_threshold_and_then_scores_right():
    # argmax over one column is class 0 for every sample: Accuracy read the share of class 0, and
    # Agreement 1.0 for any model
    from tightfit.errors import ConfigError, EvaluationError

    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    single = torch.nn.Linear(3, 1)
    with torch.no_grad():
        single.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]])), single.bias.zero_()
    flat = torch.nn.Sequential(single, torch.nn.Flatten(0))  # (batch,) scores
    with pytest.raises(EvaluationError, match=r"one score per sample .*threshold=0.0"):
        tightfit.Accuracy([(x, y)])(single)
    assert tightfit.Accuracy([(x, y)], threshold=0.0)(single) == 1.0
    assert tightfit.Accuracy([(x, y.float().unsqueeze(1))], threshold=0.0)(single) == 1.0  # BCE-style targets
    assert tightfit.Accuracy([(x, y)], threshold=0.0)(flat) == 1.0
    flipped = torch.nn.Linear(3, 1)
    with torch.no_grad():
        flipped.weight.copy_(-single.weight), flipped.bias.zero_()
    with pytest.raises(EvaluationError, match="Agreement"):
        Agreement([x], reference=single)(flipped)
    assert Agreement([x], reference=single, threshold=0.0)(flipped) == 0.0
    assert Agreement([x], reference=single, threshold=0.0)(single) == 1.0
    with pytest.raises(ConfigError, match="threshold"):
        tightfit.Accuracy([(x, y)], threshold="0.5")


def test_each_look_spends_its_error_share_on_one_tail():
    # One interim look at confidence 0.9: the interval is one-sided at 0.1 (z 1.28), not two-sided
    # (z 1.64), since a look can only err on the side the truth is not on. A first look whose mean
    # is 1.45 standard errors above zero is decided there; one at 1.1 reads on.
    signs = torch.tensor([1.0, -1.0]).repeat(50)

    def first_look(shift: float):
        z = torch.cat([signs + shift, torch.zeros(900)])
        return sequential_test(lambda a, b: z[a:b], [100, 1000], confidence=0.9, prior_variances=[1.0])

    def ratio(shift: float) -> float:
        est = mean_estimate(signs + shift, population=1000, prior_variance=1.0, prior_weight=PRIOR_WEIGHT)
        return est.mean / est.se

    decided, undecided = first_look(0.138), first_look(0.105)
    assert 1.4 < ratio(0.138) < 1.6 and 1.0 < ratio(0.105) < 1.2
    assert decided.verdict == INFEASIBLE and decided.samples == 100
    assert undecided.samples == 1000


def test_bo_with_screened_trials_is_reproducible(mlp, digits):
    # a screened trial reaches bo as a pending point, and bo then builds a Monte-Carlo acquisition
    # whose samples came from torch's global generator: the same seed gave another run whenever
    # anything had drawn from it before (fmnist-resnet: three runs of seed 0, three answers)
    def run(global_seed: int):
        torch.manual_seed(global_seed)
        result, _ = _compress(mlp, digits, search="bo", budget=14, finetune=None)
        return result

    first, second = run(1), run(2)
    assert any(t.fidelity == "screen" for t in first.trials)  # the pending path ran
    assert [t.plan for t in first.trials] == [t.plan for t in second.trials]


# --- capped trials (Sequential.trial_samples) and their verification after the search -------------


def _edge_session(trial_samples):
    # an original right 90% of the time, and a candidate that loses 0.9 points against MaxDrop(0.01):
    # at the edge, so no look before the whole search set decides it
    n = 4000
    values = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.9).double()
    original, edge = _Fixed("original", values), _Fixed("edge", values.clone())
    edge.values[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:36]] = 0.0
    metric = _Table(n)
    config = Sequential(trial_samples=trial_samples, futility=0.0, certify_fraction=0.25)
    session = SequentialSession(config, metric, [MaxDrop(0.01)], 0)
    session.baseline(original)
    return session, metric, edge


def test_a_trial_stops_at_trial_samples_and_its_verification_reads_only_the_rest():
    session, metric, edge = _edge_session(256)
    capped = session.evaluate(edge, level="full")
    assert capped.capped and capped.samples == 256 and capped.decision.verdict == UNDECIDED
    assert len(capped.values) == 256
    before = len(metric.requests)
    verified = session.evaluate(edge, level="verify", seen=capped.values)
    read = metric.requests[before:]
    # the verification continues where the trial stopped: no sample is read twice
    assert read[0][1][0] == session.search_idx[256] and sum(len(idx) for _, idx in read) == verified.samples
    assert verified.samples == len(session.search_idx) - 256 and not verified.capped
    # and decides as a full read does: the exact value on the whole search set
    whole, _, _ = _edge_session(None)
    uncapped = whole.evaluate(edge, level="full")
    assert not uncapped.capped and uncapped.samples == len(whole.search_idx)
    assert verified.decision.verdict == uncapped.decision.verdict
    assert verified.constraint_values[0] == pytest.approx(uncapped.constraint_values[0])
    # without the values seen, a verification reads from the start
    again = session.evaluate(edge, level="verify")
    assert again.samples == len(session.search_idx)


def test_trial_samples_and_verify_top_are_checked():
    with pytest.raises(ConfigError, match="trial_samples"):
        Sequential(trial_samples=1)
    with pytest.raises(ConfigError, match="verify_top"):
        Sequential(verify_top=0)


def test_a_capped_trial_is_the_answer_only_once_verified(mlp, digits, tmp_path):
    from tightfit.report.view import run_counts

    # digits' 270 search samples, read at most 48 per trial: most trials end capped; the answer is a
    # trial decided during the search or a capped one the verification accepted, so it meets the
    # constraint on the whole search set as a full read would decide it
    config = Sequential(first_look=24, trial_samples=48)
    result, evaluate = _compress(
        mlp, digits, search="bo", budget=12, finetune=None, evaluation=config, constraint=tightfit.MaxDrop(0.03)
    )
    capped = [t for t in result.trials if t.fidelity == "capped"]
    assert capped and not any(t.feasible for t in capped)
    assert f"{len(capped)} capped undecided" in run_counts(result.trials)
    assert all(t.val_samples <= 48 for t in capped)
    assert result.feasible and result.best_trial.fidelity == "full"
    read = result.accounting.get("verified", [])
    verified = {r["trial"] for r in read}
    assert result.best_trial.number in verified or all(r["verdict"] != FEASIBLE for r in read)
    assert len(read) <= config.verify_top
    session = SequentialSession(config, evaluate, [tightfit.MaxDrop(0.03)], 0)
    session.baseline(mlp)
    search = session.search_idx
    drop = float((session.baseline_values[search] - evaluate.per_sample(result.model, search).double()).mean())
    assert drop <= 0.03 + 1e-9
    if read:
        assert any("verified on the whole search set" in n for n in result.notes)


def test_without_a_decided_answer_the_surest_capped_trial_is_verified_first():
    # three capped trials: A the smallest but over the limit, C smaller than B and within it, B the
    # one the model is surest of. Without a decided answer B is read first (an answer at all), then
    # the smaller ones, smallest first, up to verify_top
    from types import SimpleNamespace

    from tightfit.records import Measurement, TrialRecord
    from tightfit.run.sequential import verify_capped
    from tightfit.search.pick import Capped

    n = 4000
    values = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.9).double()
    lost = {"A": 60, "B": 0, "C": 20}  # wrong answers added: 1.5, 0 and 0.5 points, against a 1-point limit
    models = {}
    for name, k in lost.items():
        models[name] = _Fixed(name, values.clone())
        right = torch.nonzero(values).flatten()
        models[name].values[right[torch.randperm(len(right), generator=torch.Generator().manual_seed(2))[:k]]] = 0.0
    sizes = {"A": 100, "B": 150, "C": 120}
    trials = [
        TrialRecord(
            i, "COMPLETE", name, Measurement(0.9, sizes[name], 1, 1), float(sizes[name]), (-0.001,), fidelity="capped"
        )
        for i, name in enumerate(lost)
    ]
    setup = SimpleNamespace(
        candidate=lambda plan: models[plan],
        recovery_for=lambda trial: (None, {}),
        static=lambda model, plan, number, reuse: (b"x" * sizes[plan], reuse),
        goal=lambda measured: float(measured.size_bytes),
        baseline=Measurement(0.9, 1000, 1, 1),
        constraints=[MaxDrop(0.01)],
        seed=0,
    )
    study = SimpleNamespace(get_trials=lambda deepcopy=False: [SimpleNamespace(number=t.number) for t in trials])
    candidates = [Capped(0, 100.0, -0.001), Capped(2, 120.0, -0.002), Capped(1, 150.0, -0.01)]
    for top, read, answer in ((3, [1, 0, 2], 2), (1, [1, 0], 1)):
        session = SequentialSession(Sequential(verify_top=top, futility=0.0), _Table(n), [MaxDrop(0.01)], 0)
        session.baseline(_Fixed("original", values))
        verified = verify_capped(setup, session, study, trials, candidates, None)
        assert [r["trial"] for r in verified.read] == read
        assert verified.chosen is not None and verified.chosen.number == answer
        assert verified.chosen.fidelity == "full" and verified.chosen.feasible
    # the model expecting none to be feasible: without a decided answer they are read all the same,
    # surest first; only credible ones are read to improve on an answer
    doubtful = [Capped(0, 100.0, 0.002), Capped(2, 120.0, 0.003), Capped(1, 150.0, 0.001)]
    session = SequentialSession(Sequential(futility=0.0), _Table(n), [MaxDrop(0.01)], 0)
    session.baseline(_Fixed("original", values))
    verified = verify_capped(setup, session, study, trials, doubtful, None)
    assert [r["trial"] for r in verified.read] == [1] and verified.chosen.number == 1
    # with a decided answer of 130 bytes, only the smaller ones are read
    decided = TrialRecord(9, "COMPLETE", "B", Measurement(0.9, 130, 1, 1), 130.0, (-0.01,), fidelity="full")
    session = SequentialSession(Sequential(futility=0.0), _Table(n), [MaxDrop(0.01)], 0)
    session.baseline(_Fixed("original", values))
    verified = verify_capped(setup, session, study, trials, candidates, decided)
    assert [r["trial"] for r in verified.read] == [0, 2] and verified.chosen.number == 2


def test_a_capped_estimate_counts_as_feasible_only_a_standard_error_inside_the_limit():
    # the bisections' yes/no decisions read History.judged: a capped trial (estimate on a
    # subsample) must clear its own standard error; the models still read the estimate itself
    import numpy as np

    from tightfit.search.base import History

    def history(margin):
        return History(
            x=np.zeros((3, 1)),
            objective=np.array([3.0, 1.0, 2.0]),
            violation=np.array([-0.01, -0.002, -0.002]),
            se=np.array([0.001, 0.005, 0.001]),
            pending=np.zeros((0, 1)),
            failed=np.zeros((0, 1)),
            margin=margin,
        )

    capped = history(np.array([0.0, 0.005, 0.001]))  # trials 1 and 2 capped, 1 within its noise
    assert capped.feasible.tolist() == [True, False, True] and capped.best_feasible() == 2
    assert capped.violation.tolist() == [-0.01, -0.002, -0.002]
    assert history(None).feasible.all() and history(None).best_feasible() == 1
