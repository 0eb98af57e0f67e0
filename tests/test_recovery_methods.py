"""Recovery methods of issue 7: each step on a tiny problem with a known answer."""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from torch import nn

from tightfit.errors import ConfigError
from tightfit.export.artifact import load_model, to_bytes
from tightfit.operators import Compose, FakeQuantize, Plan, Prune, Quantize, WeightMask, apply
from tightfit.recovery import (
    HSPG,
    FineTune,
    LearningCompression,
    OBProxSG,
    ProxConnect,
    ProxSG,
    PruneSplice,
    SparseTraining,
    grid_project,
    lc,
    neuron_groups,
    remove_zero_neurons,
    sparsity_report,
    splice,
)
from tightfit.recovery.proximal import group_soft_threshold, half_space_project, orthant_project, soft_threshold


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float32))
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return p


# ---------------------------------------------------------------------- proximal optimizers
def test_soft_threshold_known_values():
    x = torch.tensor([3.0, -0.5, 0.2, -2.0, 0.0])
    assert torch.equal(soft_threshold(x, 1.0), torch.tensor([2.0, 0.0, 0.0, -1.0, 0.0]))


def test_proxsg_step_is_gradient_step_then_soft_threshold():
    p = _param([1.0, -1.0, 0.05], [0.5, 0.5, 0.0])
    ProxSG([p], lr=0.1, lambda_=1.0).step()
    # z = x - 0.1*g = [0.95, -1.05, 0.05]; shrink by 0.1 -> [0.85, -0.95, 0]
    assert torch.allclose(p.detach(), torch.tensor([0.85, -0.95, 0.0]))


def test_obproxsg_orthant_step_zeroes_sign_changes_and_keeps_zeros():
    p = _param([1.0, -0.2, 0.0, 0.3], [0.0, -5.0, 7.0, 1.0])
    opt = OBProxSG([p], lr=0.1, lambda_=1.0, n_p=0)  # orthant steps from the start
    opt.step()
    # trial = x - lr*(g + lambda*sign(x)) on nonzeros: [0.9, -0.2+0.5-0.1... ] -> computed below
    expected_trial = torch.tensor([1.0 - 0.1 * 1.0, -0.2 - 0.1 * (-5.0 - 1.0), 0.0, 0.3 - 0.1 * (1.0 + 1.0)])
    # entry 1 crosses zero (-0.2 -> 0.4): projected to 0; entry 2 was zero: stays zero despite gradient
    assert torch.allclose(p.detach(), torch.tensor([expected_trial[0], 0.0, 0.0, expected_trial[3]]))
    assert torch.equal(orthant_project(torch.tensor([0.5, -0.5]), torch.tensor([1.0, 1.0])), torch.tensor([0.5, 0.0]))


def test_obproxsg_switches_from_prox_to_orthant_after_n_p_steps():
    p = _param([0.0, 1.0], [-1.0, 0.0])
    opt = OBProxSG([p], lr=1.0, lambda_=0.5, n_p=1)
    opt.step()  # prox step: 0 - 1*(-1) = 1 -> shrink 0.5 -> 0.5: a zero can become nonzero
    assert p[0].item() == pytest.approx(0.5)
    p.data[0] = 0.0
    p.grad = torch.tensor([-1.0, 0.0])
    opt.step()  # orthant step: the zero stays zero
    assert p[0].item() == 0.0


def test_hspg_group_prox_and_half_space_zero_whole_groups():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    assert torch.allclose(group_soft_threshold(rows, 1.0), torch.tensor([[2.4, 3.2], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    trial = torch.tensor([[-0.1, 0.5], [0.9, 0.8]])  # row 0 leaves the half-space (inner < 0)
    assert torch.equal(half_space_project(trial, x), torch.tensor([[0.0, 0.0], [0.9, 0.8]]))

    w = _param([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]])
    b = _param([0.0, 1.0], [0.0, 0.0])
    HSPG([{"params": [w, b]}], lr=1.0, lambda_=0.1, n_p=0).step()
    # group 0 = (w0, b0) = (1, 0, 0): trial = x - (g + 0.1 x/|x|) = (1-2.1, 0, 0) -> leaves half-space -> zero
    assert torch.equal(w[0].detach(), torch.zeros(2)) and b[0].item() == 0.0
    assert torch.all(w[1] != 0) and b[1].item() != 0.0


def test_hspg_zero_group_stays_zero():
    w = _param([[0.0, 0.0]], [[-3.0, 1.0]])
    HSPG([w], lr=1.0, lambda_=0.1, n_p=0).step()
    assert torch.equal(w.detach(), torch.zeros(1, 2))


def test_optimizer_arguments_are_checked():
    with pytest.raises(ConfigError, match="lambda_"):
        ProxSG([nn.Parameter(torch.zeros(1))], lambda_=-1.0)
    with pytest.raises(ConfigError, match="eps"):
        HSPG([nn.Parameter(torch.zeros(1))], eps=1.5)


# ---------------------------------------------------------------------- learning-compression
def test_lc_projection_and_multiplier_update():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.9, 0.5, 0.05]]))
    Prune(0.5).apply(layer, {"sparsity": 0.5})
    site = lc.sites(layer)[0]
    w = site.original.detach().clone()
    lam = torch.tensor([[0.0, 0.0, 0.0, -1.0]])
    mu = 2.0
    theta = lc.c_step(w, lam, mu, site)
    # w - lam/mu = [0.1, -0.9, 0.5, 0.55]: the two largest survive (-0.9, 0.55); the mask follows
    assert torch.allclose(theta, torch.tensor([[0.0, -0.9, 0.0, 0.55]]))
    assert torch.equal(site.chain[0].mask, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    new = lc.multiplier_update(lam, w, theta, mu)
    assert torch.allclose(new, lam - mu * (w - theta))
    # and the quantizer's projection is rounding onto its grid
    q = FakeQuantize(2)
    assert torch.equal(q.project(torch.tensor([[0.9, -0.2, -1.0]])), torch.tensor([[1.0, 0.0, -1.0]]))


def test_lc_penalty_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    theta, lam = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    lc.penalty(w, theta, lam, 4.0).backward()
    assert torch.allclose(w.grad, 4.0 * (w.detach() - theta - lam / 4.0))


@functools.lru_cache(maxsize=1)
def _trained_toy(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    FineTune(loader, epochs=15, lr=1e-2)(model)
    return model.eval(), loader


def _toy():
    model, loader = _trained_toy()
    return copy.deepcopy(model), loader


def _accuracy(loader):
    def evaluate(model):
        with torch.no_grad():
            return sum(int((model(x).argmax(1) == y).sum()) for x, y in loader) / sum(len(y) for _, y in loader)

    return evaluate


def test_lc_returns_the_compressed_model_that_is_saved():
    model, loader = _toy()
    plan = Plan.from_strategy(
        Compose([Prune(), Quantize(bits=(4,))]),
        {n: {"prune": {"sparsity": 0.6}, "quantize": {"bits": 4}} for n in ("0", "2")},
    )
    candidate = apply(plan, model)
    rec = LearningCompression(loader, epochs=3, evaluate=_accuracy(loader))
    rec(candidate)
    assert len(rec.history) == 3 and rec.steps_taken == 3 * len(loader)
    for name in ("0", "2"):
        chain = candidate.get_submodule(name).parametrizations.weight
        # originals are theta: the compressed forward reproduces them, at the plan's sparsity
        assert torch.allclose(candidate.get_submodule(name).weight, chain.original, atol=1e-6)
        assert chain[0].sparsity == pytest.approx(0.6, abs=0.02)
    loaded = load_model(io.BytesIO(to_bytes(candidate, plan)))
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x), candidate(x), atol=1e-5)
    assert _accuracy(loader)(candidate) == max(m for _, _, m in rec.history)


def test_lc_needs_a_projectable_compression():
    model, loader = _toy()
    with pytest.raises(ConfigError, match="project"):
        LearningCompression(loader, epochs=1)(model)


# ---------------------------------------------------------------------- prune-and-splice
def test_mask_hysteresis():
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    w = torch.tensor([0.85, 0.95, 1.05, 1.15, -1.2, -0.5])
    splice.update_mask(mask, w, threshold=1.0)
    # below 0.9 -> pruned; above 1.1 -> spliced; between -> unchanged (0.95 kept, 1.05 stays pruned)
    assert torch.equal(mask, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]))


def test_threshold_and_c_for_sparsity_agree():
    w = torch.randn(1000)
    c = splice.c_for_sparsity(w, 0.7)
    t = splice.layer_threshold(w, c)
    assert float((w.abs() < t).float().mean()) == pytest.approx(0.7, abs=0.01)


def test_full_gradient_reaches_pruned_weights_and_masks_move():
    model, loader = _toy()
    plan = Plan.from_strategy(Compose([Prune()]), {n: {"prune": {"sparsity": 0.7}} for n in ("0", "2")})
    candidate = apply(plan, model)
    mask_before = candidate[0].parametrizations.weight[0].mask.clone()
    original_before = candidate[0].parametrizations.weight.original.detach().clone()
    rec = PruneSplice(loader, epochs=3, lr=1e-2)
    rec(candidate)
    chain = candidate[0].parametrizations.weight
    assert isinstance(chain[0], WeightMask)  # the saved model holds ordinary masks again
    pruned = mask_before == 0
    moved = (chain.original.detach() - original_before)[pruned].abs()
    assert moved.max() > 0  # pruned weights were trained (straight-through gradient)
    assert not torch.equal(chain[0].mask, mask_before)  # masks were recomputed
    assert (
        torch.equal(candidate[0].weight == 0, chain[0].mask == 0)
        or (candidate[0].weight[chain[0].mask == 0] == 0).all()
    )


# ---------------------------------------------------------------------- proximal sparse training
def test_hspg_training_zeroes_whole_neurons_that_can_be_removed():
    model, loader = _toy()
    SparseTraining(loader, method="hspg", epochs=10, lr=0.1, lambda_=0.2, prox_fraction=0.3)(model)
    report = sparsity_report(model)
    assert report["0"]["zero_groups"] > 0
    x = torch.randn(7, 8)
    slim, removed = remove_zero_neurons(model, example_input=x)
    assert removed == {"0": report["0"]["zero_groups"]}
    assert slim[0].out_features == 16 - removed["0"]
    assert torch.allclose(slim(x), model(x), atol=1e-5)


def test_neuron_groups_leave_the_output_layer_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = neuron_groups(model, 1e-3)
    assert groups[0]["params"] == [model[0].weight, model[0].bias] and groups[0]["lambda_"] == 1e-3
    assert groups[-1]["lambda_"] == 0.0 and model[2].weight in groups[-1]["params"]


# ---------------------------------------------------------------------- ProxConnect
def test_grids():
    w = torch.tensor([[0.1, -0.9, 1.1, -0.05]])
    assert torch.allclose(grid_project(w, "binary", 2), torch.tensor([[0.5375, -0.5375, 0.5375, -0.5375]]))
    t = grid_project(w, "ternary", 2)  # threshold 0.7*0.5375 = 0.376: a = mean(0.9, 1.1) = 1.0
    assert torch.allclose(t, torch.tensor([[0.0, -1.0, 1.0, 0.0]]))
    assert torch.equal(grid_project(w, "kbit", 4), FakeQuantize(4)(w))


def test_proxconnect_forward_is_the_proximal_point_and_ste_is_the_limit():
    from tightfit.recovery.proxconnect import ProxQuantStep

    step = ProxQuantStep("ternary", 2)
    w = torch.tensor([[0.1, -0.9, 1.1, -0.05]], requires_grad=True)
    q = grid_project(w.detach(), "ternary", 2)
    step.rho = 3.0
    out = step(w)
    assert torch.allclose(out, (w.detach() + 3.0 * q) / 4.0)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the gradient at P(w) updates w
    step.rho = math.inf
    assert torch.equal(step(w), q)


def test_proxconnect_ends_on_the_grid_the_file_stores():
    model, loader = _toy()
    plan = Plan.from_strategy(Compose([Quantize(bits=(2,))]), {n: {"quantize": {"bits": 2}} for n in ("0", "2")})
    candidate = apply(plan, model)
    ProxConnect(loader, epochs=2)(candidate)
    w = candidate[0].weight.detach()
    assert torch.unique(w.abs(), dim=None).numel() <= 1 + w.shape[0]  # per row: {0, a}
    loaded = load_model(io.BytesIO(to_bytes(candidate, plan)))
    x = torch.randn(4, 8)
    assert torch.allclose(loaded(x), candidate(x), atol=1e-5)
    with pytest.raises(ConfigError, match="bits=2"):
        ProxConnect(loader, grid="ternary")(
            apply(Plan.from_strategy(Compose([Quantize(bits=(4,))]), {"0": {"quantize": {"bits": 4}}}), model)
        )


# ---------------------------------------------------------------------- tuned recovery in a search
def test_tuned_recovery_joins_the_search_space():
    from tightfit import compress
    from tightfit.operators.base import Hyperparameter
    from tightfit.recovery import Tuned

    model, loader = _toy()
    base = FineTune(loader, epochs=1, lr=1e-3)
    tuned = Tuned(base, lr=(1e-4, 1e-1), epochs=(1, 2), optimizer=["adam", "sgd"])
    assert {hp.name: (hp.integer, hp.log, hp.choices) for hp in tuned.hyperparameters()} == {
        "lr": (False, True, None),
        "epochs": (True, False, None),
        "optimizer": (False, False, ("adam", "sgd")),
    }
    configured = tuned.with_settings(lr=0.05, epochs=2, optimizer="sgd")
    assert (configured.lr, configured.epochs, configured.optimizer) == (0.05, 2, "sgd") and base.lr == 1e-3
    with pytest.raises(ConfigError, match="no hyperparameter"):
        Tuned(base, mu=(0.1, 1.0))
    with pytest.raises(ConfigError, match="range"):
        Tuned(base, lr="fast")

    result = compress(
        model,
        evaluate=_accuracy(loader),
        strategy=Prune(sparsity=(0.0, 0.9)),
        finetune=tuned,
        budget=4,
        search="random",
        seed=0,
    )
    assert len(result.trials) == 4 and all(t.state == "COMPLETE" for t in result.trials)
    lc_default = Tuned(LearningCompression(loader, epochs=2))
    assert "mu" in {hp.name for hp in lc_default.hyperparameters()}
    assert isinstance(lc_default.specs["c_steps_per_epoch"], Hyperparameter)


def test_tuned_settings_are_stored_per_trial(tmp_path):
    import optuna

    from tightfit import compress
    from tightfit.recovery import Tuned

    model, loader = _toy()
    tuned = Tuned(FineTune(loader, epochs=1, lr=1e-3), lr=(1e-4, 1e-1), optimizer=["adam", "sgd"])
    compress(
        model,
        evaluate=_accuracy(loader),
        strategy=Prune(sparsity=(0.0, 0.9)),
        finetune=tuned,
        budget=3,
        search="random",
        seed=1,
        run_dir=tmp_path / "run",
    )
    study = optuna.load_study(study_name="tightfit", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    for t in study.trials:
        assert set(t.user_attrs["recovery"]) == {"lr", "optimizer"}
        assert t.user_attrs["recovery"]["lr"] == t.params["recovery/lr"]
        assert t.user_attrs["finetune_steps"] == len(loader)


def test_lc_penalty_prox_is_the_exact_minimizer():
    # argmin_v 1/(2s) ||v - w||^2 + mu/2 ||v - theta - lam/mu||^2
    w, theta, lam, mu, s = torch.tensor([1.0, -2.0]), torch.tensor([0.0, -1.0]), torch.tensor([0.5, 0.0]), 4.0, 0.25
    v = w.clone()
    lc.penalty_prox(v, theta, lam, mu, s)
    target = theta + lam / mu
    assert torch.allclose(v, (w / s + mu * target) / (1 / s + mu))
    big = w.clone()
    lc.penalty_prox(big, theta, lam, 1e9, 1.0)  # mu -> inf: w is pulled onto theta
    assert torch.allclose(big, theta, atol=1e-6)


def test_operator_projections():
    w = torch.tensor([[0.3, -0.1, 0.8, -0.5]])
    assert torch.equal(Prune().project(w, {"sparsity": 0.5}), torch.tensor([[0.0, 0.0, 0.8, -0.5]]))
    assert torch.equal(Quantize(bits=(2, 4)).project(w, {"bits": 2}), FakeQuantize(2)(w))


def test_lc_inside_compress_saves_what_it_measured():
    from tightfit import MinMetric, compress

    model, loader = _toy()
    evaluate = _accuracy(loader)
    result = compress(
        model,
        evaluate=evaluate,
        strategy=Prune(sparsity=(0.3, 0.6)),
        constraint=MinMetric(0.0),
        finetune=LearningCompression(loader, epochs=2, evaluate=evaluate),
        budget=2,
        search="random",
        seed=0,
    )
    best = result.best_trial
    assert result.feasible and result.metric == best.measurement.metric  # the saved model is the one measured


def test_lc_divergence_is_a_clear_error():
    from tightfit.errors import EvaluationError

    model, loader = _toy()
    plan = Plan.from_strategy(Compose([Prune()]), {"0": {"prune": {"sparsity": 0.5}}})
    with pytest.raises(EvaluationError, match="lower `lr`"):
        LearningCompression(loader, epochs=2, lr=1e30)(apply(plan, model))


@pytest.mark.parametrize(
    "make",
    [
        lambda loader: SparseTraining(loader, method="obproxsg", epochs=2, lambda_=0.05),
        lambda loader: SparseTraining(loader, method="hspg", epochs=2, lambda_=0.05),
        lambda loader: PruneSplice(loader, epochs=2),
    ],
)
def test_sparse_recoveries_inside_compress_on_a_pruned_plan(make):
    from tightfit import MinMetric, compress

    model, loader = _toy()
    result = compress(
        model,
        evaluate=_accuracy(loader),
        strategy=Prune(sparsity=0.5),
        constraint=MinMetric(0.0),
        objective="nonzeros",
        finetune=make(loader),
        budget=1,
        search="random",
        seed=0,
    )
    assert result.feasible and result.metric == result.best_trial.measurement.metric
    assert result.best_trial.measurement.nonzeros < 192  # the plan's zeros (plus any the method adds) are in the file


@pytest.mark.parametrize("cls", [FineTune, LearningCompression, PruneSplice, ProxConnect])
def test_a_misspelt_optimizer_fails_when_the_recovery_is_built(cls):
    _, loader = _toy()
    with pytest.raises(ConfigError, match=f"{cls.__name__}: `optimizer` must be one of"):
        cls(loader, optimizer="adma")


def test_the_default_fine_tuning_loss_names_itself_on_a_batch_without_labels():
    # the batch reader is shared with Accuracy; its error must name what failed and what to pass instead
    from tightfit.errors import EvaluationError
    from tightfit.recovery._base import cross_entropy_loss

    with pytest.raises(EvaluationError, match=r"fine-tuning loss expects .* loss=callable\(model, batch\)"):
        cross_entropy_loss(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(EvaluationError, match="fine-tuning loss: a dict batch needs a label field"):
        cross_entropy_loss(nn.Linear(3, 2), {"x": torch.randn(2, 3)})


class _OwnLossLM(nn.Module):
    """A Hugging Face-style causal LM: takes ``labels`` (one per token) and returns its own loss."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = None
        if labels is not None:  # next-token prediction: the labels are shifted inside, as Hugging Face does
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1))
        return {"logits": logits, "loss": loss}


def test_the_default_fine_tuning_loss_is_the_models_own_when_it_takes_labels():
    # dict batches with per-token `labels` failed ("scores of shape (4, 6, 10) for labels of shape (4, 6)")
    from tightfit.recovery._base import cross_entropy_loss

    torch.manual_seed(0)
    model = _OwnLossLM()
    ids = torch.randint(0, 10, (4, 6))
    batch = {"input_ids": ids, "labels": ids}
    assert torch.equal(cross_entropy_loss(model, batch), model(**batch)["loss"])
    before = float(model(**batch)["loss"])
    FineTune([batch] * 20, epochs=1, lr=1e-2)(model)
    assert float(model(**batch)["loss"]) < before


def test_a_one_shot_iterator_as_training_loader_is_refused():
    # a generator gave the first epoch its batches and every later epoch and trial none, silently
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with pytest.raises(ConfigError, match=r"`loader` is an iterator \(generator\).*DataLoader"):
        FineTune(((x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)), epochs=2)
    FineTune([(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)], epochs=2)  # a list: read every epoch
