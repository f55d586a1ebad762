"""Denoising score matching (first and second order) and its weightings, against the closed-form minimum."""

import math

import pytest
import torch
from scipy import integrate

import sdeflow
from sdeflow.likelihood.plans import fit_proposal
from sdeflow.likelihood.time_proposals import ImportanceTime
from sdeflow.nets.oracles import GaussianMixture
from oracle_helpers import SDES, exact_model, gaussian
from test_model import lambda_net



def _dsm_minimum_per_time(sde, data, t):
    """min_s E‖std·s + ε‖²/2 = ½ Σ_i m²s_i² / (m²s_i² + v), attained at the exact score."""
    t = torch.as_tensor(t, dtype=torch.float64)
    m2, v = sde.mean_weight(t) ** 2, sde.var(t)
    return 0.5 * (m2 * data.stds[0] ** 2 / (m2 * data.stds[0] ** 2 + v)).sum()

@pytest.mark.parametrize("name", list(SDES))
def test_dsm_attains_its_known_minimum_at_the_exact_score(name):
    sde, data = SDES[name](), gaussian()
    gen = torch.Generator().manual_seed(0)
    x = data.sample(40000, generator=gen, dtype=torch.float64)
    t = torch.full((40000,), 0.2, dtype=torch.float64)
    exact = sdeflow.dsm(exact_model(sde, data, "noise"), x, weighting="noise", t=t, generator=torch.Generator().manual_seed(1))
    assert abs(exact.mean() - _dsm_minimum_per_time(sde, data, 0.2)) < 5 * exact.std() / 200

    class Perturbed(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, y, t):
            return 1.2 * self.net(y, t)

    worse = sdeflow.PluginReverseSDE(sde, Perturbed(exact_model(sde, data, "noise").net), "noise").double()
    # With the same noise draws, scaling the exact score by 1.2 costs exactly ½·0.2²·E‖std·s‖²
    # = 0.02·Σ v/(m²s² + v) (the cross term vanishes at the optimum).
    excess = sdeflow.dsm(worse, x, weighting="noise", t=t, generator=torch.Generator().manual_seed(1)) - exact
    m2, v = sde.mean_weight(t[0]) ** 2, sde.var(t[0])
    expected = 0.02 * (v / (m2 * data.stds[0] ** 2 + v)).sum()
    assert abs(excess.mean() - expected) < 5 * excess.std() / 200 and expected > 0

class _ScorePlusBump(torch.nn.Module):
    """The exact mixture score plus θ·sin(y), θ a learnable scalar (0: exact); ``scale`` multiplies all."""

    def __init__(self, net, scale=1.0):
        super().__init__()
        self.net, self.scale = net, scale
        self.theta = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, y, t):
        return self.scale * self.net(y, t) + self.theta * torch.sin(y)

def _second_order_gradient(scale, weight=1.0, chunks=20, n=4000):
    """Mean and standard error (over chunks) of d E[dsm(order=2)]/dθ at θ = 0, t = 0.3, on a
    two-component 2-D mixture (its Hessian varies with y)."""
    sde = SDES["vp"]()
    data = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [[0.4, 0.7], [0.6, 0.3]])
    model = sdeflow.PluginReverseSDE(sde, _ScorePlusBump(exact_model(sde, data, "score").net, scale), "score")
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(chunks):
        x = data.sample(n, generator=gen, dtype=torch.float64)
        t = torch.full((n,), 0.3, dtype=torch.float64)
        loss = sdeflow.dsm(model, x, weighting="noise", t=t, order=2, second_order_weight=weight, generator=gen).mean()
        grads.append(torch.autograd.grad(loss, model.net.theta)[0])
    grads = torch.stack(grads)
    return float(grads.mean()), float(grads.std() / math.sqrt(chunks))

def test_second_order_dsm_is_stationary_at_the_exact_score():
    """E[r rᵀ | y] = std²∇²log p_t + I: at the exact score, moving along any direction (here θ·sin y)
    leaves the expected loss flat, because both its first- and second-order parts are minimised;
    a 10 % wrong score is not stationary."""
    mean, se = _second_order_gradient(scale=1.0)
    assert abs(mean) < 4 * se, (mean, se)
    wrong_mean, wrong_se = _second_order_gradient(scale=0.9)
    assert abs(wrong_mean) > 10 * wrong_se, (wrong_mean, wrong_se)

def test_second_order_dsm_matches_its_formula_on_a_linear_score():
    """s(y) = A y + b has J = A everywhere (A not symmetric): the loss is the docstring's formula."""
    sde = SDES["vp"]()
    A = torch.tensor([[-1.5, 0.3], [0.1, -0.7]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.4], dtype=torch.float64)
    model = sdeflow.PluginReverseSDE(sde, lambda_net(lambda y, t: y @ A.T + b), "score")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    with torch.no_grad():  # builds its own graph for J
        loss = sdeflow.dsm(model, x, weighting="noise", t=t, order=2, second_order_weight=0.3, generator=torch.Generator().manual_seed(1))
    y, eps, std, _ = sde.sample(x, t, return_noise=True, generator=torch.Generator().manual_seed(1))
    std = std.reshape(-1, 1)
    s = y @ A.T + b
    r = eps + std * s
    first = 0.5 * (r ** 2).sum(1)
    frob = ((std[:, :, None] ** 2 * A + torch.eye(2, dtype=torch.float64) - r[:, :, None] * r[:, None, :]) ** 2).sum((1, 2))
    trace = (std[:, 0] ** 2 * A.trace() + 2 - (r ** 2).sum(1)) ** 2
    torch.testing.assert_close(loss, first + 0.3 * (frob + trace))
    assert not loss.requires_grad
    # order 1 is the first-order part alone
    torch.testing.assert_close(sdeflow.dsm(model, x, weighting="noise", t=t, generator=torch.Generator().manual_seed(1)), first)

@pytest.mark.parametrize("weighting", ["noise", "likelihood"])
@pytest.mark.parametrize("time_sampling", ["uniform", "importance", "fitted"])
def test_dsm_estimates_the_same_objective_under_every_proposal(weighting, time_sampling):
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "score")
    importance = ImportanceTime(sde)
    weight = (lambda t: 1.0) if weighting == "noise" else (
        lambda t: sde.T * float(importance.unnormalized(torch.tensor(t, dtype=torch.float64))))
    objective = integrate.quad(lambda t: weight(t) * float(_dsm_minimum_per_time(sde, data, t)), 0, sde.T,
                               points=[importance.t_eps], limit=200)[0] / sde.T
    gen = torch.Generator().manual_seed(1)
    x = data.sample(60000, generator=gen, dtype=torch.float64)
    if time_sampling == "fitted":
        time_sampling = fit_proposal(lambda t: torch.ones_like(t)[:, None], sde, n_bins=8, dtype=torch.float64).proposal
    loss = sdeflow.dsm(model, x, time_sampling=time_sampling, weighting=weighting, generator=gen)
    assert abs(loss.mean().item() - objective) < 5 * loss.std().item() / math.sqrt(len(loss))

@pytest.mark.parametrize("time_sampling", ["uniform", "importance"])
def test_dsm_from_t_min_estimates_the_exactly_weighted_objective_on_t_min_to_T(time_sampling):
    # t_min > 0: the weighting is T·g²/v itself on [t_min, T] (no truncation at 10⁻³T), the path term
    # of the ELBO started at t_min.
    sde, data, t_min = SDES["vp"](), gaussian(), 1e-5
    model = exact_model(sde, data, "score")
    objective = integrate.quad(lambda t: float(sde.g2(torch.tensor(t, dtype=torch.float64))
                                               / sde.var(torch.tensor(t, dtype=torch.float64))
                                               * _dsm_minimum_per_time(sde, data, t)),
                               t_min, sde.T, points=[1e-4, 1e-3, 1e-2], limit=400)[0]
    gen = torch.Generator().manual_seed(2)
    x = data.sample(60000, generator=gen, dtype=torch.float64)
    loss = sdeflow.dsm(model, x, time_sampling=time_sampling, weighting="likelihood", t_min=t_min, generator=gen)
    assert abs(loss.mean().item() - objective) < 5 * loss.std().item() / math.sqrt(len(loss))
    # the truncated weighting of t_min = 0 is a different objective, smaller by more than the noise
    truncated = sdeflow.dsm(model, x, time_sampling=time_sampling, weighting="likelihood", generator=gen)
    assert objective - truncated.mean().item() > 10 * truncated.std().item() / math.sqrt(len(truncated))

def test_stratified_times_estimate_the_same_dsm_objective_with_less_variance():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "score")
    importance = ImportanceTime(sde)
    objective = integrate.quad(lambda t: float(_dsm_minimum_per_time(sde, data, t)), 0, sde.T,
                               points=[importance.t_eps], limit=200)[0] / sde.T
    gen = torch.Generator().manual_seed(3)
    means = {}
    for stratified in (False, True):
        x = data.sample(64 * 600, generator=gen, dtype=torch.float64)
        loss = torch.stack([sdeflow.dsm(model, batch, weighting="noise", time_sampling="importance", stratified_time=stratified,
                                        generator=gen).mean() for batch in x.split(64)])
        assert abs(loss.mean().item() - objective) < 5 * loss.std().item() / math.sqrt(len(loss))
        means[stratified] = loss
    assert means[True].var() < 0.8 * means[False].var()  # the part of the variance that t adds is gone

class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, y, t):
        return self.conv(y) * t[:, None, None, None]

def test_any_batch_size_and_training_through_the_losses():
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), TinyConvNet())
    x = torch.rand(1, 3, 4, 4)
    for loss in (sdeflow.dsm(model, x, time_sampling="importance"), -sdeflow.elbo(model, x, time_sampling="importance")):
        assert loss.shape == (1,)
        model.zero_grad()
        loss.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sdeflow.elbo(model, x).shape == (1,)  # the default fits a proposal on this one image


def test_dsm_defaults_are_the_training_loops():
    """One default recipe: sdeflow.dsm's time sampling, weighting, t_min and second-order weight are
    TrainConfig's."""
    import inspect

    from sdeflow.training import TrainConfig

    defaults = {name: p.default for name, p in inspect.signature(sdeflow.dsm).parameters.items()}
    config = TrainConfig(steps=1, batch_size=1)
    assert (defaults["time_sampling"], defaults["weighting"], defaults["t_min"], defaults["second_order_weight"],
            defaults["stratified_time"]) == (config.time_sampling, config.weighting, config.loss_t_min,
                                             config.second_order_weight, config.stratified_time)
