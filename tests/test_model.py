import math

import pytest
import torch
from scipy import integrate

import sdeflow
from sdeflow.time_sampling import ImportanceTime
from sdeflow.oracles import GaussianMixture
from sdeflow.evaluation import tail_diagnostics
from oracle_helpers import (SDES, OffsetNoiseNet, exact_model, expected_elbo, expected_ode_log_prob,
                            expected_truncated_elbo, gaussian)

PARAMETERIZATIONS = list(sdeflow.model.PARAMETERIZATIONS)


def _repeat_estimates(estimate, x, repeats):
    """Run ``estimate`` on x repeated; returns per-example (mean, standard error)."""
    values = estimate(x.repeat(repeats, 1)).reshape(repeats, x.shape[0])
    return values.mean(0), values.std(0) / math.sqrt(repeats)


ELBO_OPTIONS = [
    dict(time_sampling="uniform", probe="rademacher", divergence="hutchinson"),
    dict(time_sampling="importance", probe="gaussian", divergence="hutchinson"),
    dict(time_sampling="fitted", probe="rademacher", divergence="hutchinson"),
    dict(time_sampling="importance", divergence="exact", n_slices=3),
    dict(),  # the defaults
    dict(n_slices=4),  # the defaults with stratified slices
    dict(t_min=0.0, time_sampling="uniform"),  # the bound run to t = 0 (sdeflow-light's)
    dict(t_min=0.1),  # a truncation whose decoder gap is far outside the tolerance
    dict(t_min=0.1, time_sampling="importance"),
]


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("options", ELBO_OPTIONS, ids=lambda o: "-".join(map(str, o.values())) or "defaults")
def test_elbo_is_unbiased_for_the_exact_bound(name, options):
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, "drift")
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    mean, se = _repeat_estimates(lambda xs: model.elbo(xs, generator=gen, **options), x, 3000)
    expected = expected_truncated_elbo(sde, data, x, options.get("t_min", model.default_t_min()))
    assert ((mean - expected).abs() < 5 * se + 1e-3).all(), (mean, expected, se)


def test_truncation_costs_only_the_decoder_gap():
    """For the exact score, the bound from t_min with the Gaussian decoder approaches the one run to 0
    as t_min → 0 (the default's loss is far below the estimators' noise), and is looser at t_min = 0.1."""
    sde, data = SDES["vp"](), gaussian()
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = expected_elbo(sde, data, x)
    assert (full - expected_truncated_elbo(sde, data, x, 1e-5)).abs().max() < 1e-3
    assert (full - expected_truncated_elbo(sde, data, x, 0.1)).min() > 0.1


def _two_gaussians():
    return GaussianMixture(torch.tensor([[-0.6, 0.2, 0.4], [0.5, -0.3, 0.9]]), torch.tensor([[0.3, 0.5, 0.4], [0.6, 0.2, 0.5]]))


@pytest.mark.parametrize("oracle", ["gaussian", "mixture"])
def test_an_error_that_does_not_vanish_at_t0_is_heavy_tailed_only_down_to_t0(oracle):
    """The ε network of OffsetNoiseNet is the exact one of a Gaussian (closed forms) or of a mixture of
    two (Monte-Carlo oracle) plus a constant error δ at every t, as a trained network is near t = 0.
    Run to t = 0 its bound is −∞: the estimates (uniform or importance time, Hutchinson, as
    sdeflow-light) are heavy-tailed, a few draws carrying most of their variance. From the default
    t_min the default estimator is unbiased for the oracle and its estimates are not heavy-tailed."""
    sde, data = SDES["vp"](), (gaussian() if oracle == "gaussian" else _two_gaussians())
    offset = torch.tensor([0.5, -0.5, 0.5], dtype=torch.float64)
    model = sdeflow.PluginReverseSDE(sde, OffsetNoiseNet(sde, data, offset), "noise").double()
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for time_sampling in ("uniform", "importance"):
        to_zero = model.elbo(x[:1].repeat(20000, 1), time_sampling=time_sampling, t_min=0.0, generator=gen)
        assert tail_diagnostics(to_zero.detach())["heavy_tailed"], time_sampling
    values = model.elbo(x.repeat(3000, 1), generator=gen).reshape(3000, 4)
    expected = expected_truncated_elbo(sde, data, x, model.default_t_min(), offset)
    mean, se = values.mean(0), values.std(0) / math.sqrt(3000)
    assert ((mean - expected).abs() < 5 * se + 1e-3).all(), (mean, expected, se)
    assert not any(tail_diagnostics(values[:, i])["heavy_tailed"] for i in range(4))
    # the offset costs what the closed form says: far more than the estimator's noise
    assert (expected_truncated_elbo(sde, data, x, model.default_t_min()) - expected).min() > 10 * se.max()


def test_elbo_gap_is_the_prior_mismatch_only():
    """A wrong drift sign or a missing ∇·f term would shift the bound by tens of nats: it does not."""
    sde, data = SDES["vp"](), gaussian()
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gap = (data.log_prob(x) - expected_elbo(sde, data, x)).abs().max()
    assert gap < 1e-3


@pytest.mark.parametrize("name", list(SDES))
def test_parameterizations_give_the_same_elbo(name):
    sde, data = SDES[name](), gaussian()
    x = data.sample(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = [exact_model(sde, data, p).elbo(x, n_slices=2, time_sampling="importance",
                                             generator=torch.Generator().manual_seed(5))
              for p in PARAMETERIZATIONS]
    assert len(values) == 4
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(SDES))
def test_velocity_coefficients_recover_the_noise_from_the_velocity(name):
    # y = m·x + std·ε, v = α·ε − σ·x: then c·y = α·x + σ·ε with α² + σ² = 1, and ε = σ·c·y + α·v.
    sde = SDES[name]()
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * sde.T
    x, eps = torch.randn(2, 64, 3, generator=gen, dtype=torch.float64)
    y = sde.mean_weight(t)[:, None] * x + sde.std(t)[:, None] * eps
    c, alpha, sigma = sdeflow.model.velocity_coefficients(sde, t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    torch.testing.assert_close(c[:, None] * y, alpha[:, None] * x + sigma[:, None] * eps)
    velocity = alpha[:, None] * eps - sigma[:, None] * x
    torch.testing.assert_close((sigma * c)[:, None] * y + alpha[:, None] * velocity, eps)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("div", ["exact", "hutchinson"])
def test_log_prob_ode_matches_the_exact_flow(name, div):
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, "score")
    x = data.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp, info = model.log_prob_ode(x, divergence=div, return_info=True, generator=torch.Generator().manual_seed(1))
    assert info["nfe"] > 0
    # the Jacobian of a diagonal Gaussian's flow is diagonal, so even one Rademacher probe is exact
    assert (logp - expected_ode_log_prob(sde, data, x)).abs().max() < 1e-3 * data.dim
    # from t_min = 0.5 the model outputs y_{t_min}/m: its density is the marginal there, rescaled
    late = model.log_prob_ode(x, divergence=div, t_min=0.5, generator=torch.Generator().manual_seed(1))
    assert (late - expected_ode_log_prob(sde, data, x, 0.5)).abs().max() < 1e-3 * data.dim
    assert (late - logp).abs().max() > 0.05  # far from the t_min = 0 value: the test can tell them apart


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
    exact = exact_model(sde, data, "noise").dsm(x, t=t, generator=torch.Generator().manual_seed(1))
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
    excess = worse.dsm(x, t=t, generator=torch.Generator().manual_seed(1)) - exact
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
        loss = model.dsm(x, t=t, order=2, second_order_weight=weight, generator=gen).mean()
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
        loss = model.dsm(x, t=t, order=2, second_order_weight=0.3, generator=torch.Generator().manual_seed(1))
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
    torch.testing.assert_close(model.dsm(x, t=t, generator=torch.Generator().manual_seed(1)), first)


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
        model.time_proposal = sdeflow.FittedTime.fit(lambda t: torch.ones_like(t)[:, None], sde, n_bins=8,
                                                     dtype=torch.float64)
    loss = model.dsm(x, time_sampling=time_sampling, weighting=weighting, generator=gen)
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
    loss = model.dsm(x, time_sampling=time_sampling, weighting="likelihood", t_min=t_min, generator=gen)
    assert abs(loss.mean().item() - objective) < 5 * loss.std().item() / math.sqrt(len(loss))
    # the truncated weighting of t_min = 0 is a different objective, smaller by more than the noise
    truncated = model.dsm(x, time_sampling=time_sampling, weighting="likelihood", generator=gen)
    assert objective - truncated.mean().item() > 10 * truncated.std().item() / math.sqrt(len(truncated))


def test_stratified_times_estimate_the_same_dsm_objective_with_less_variance():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "score")
    importance = ImportanceTime(sde)
    objective = integrate.quad(lambda t: float(_dsm_minimum_per_time(sde, data, t)), 0, sde.T,
                               points=[importance.t_eps], limit=200)[0] / sde.T
    gen = torch.Generator().manual_seed(3)
    means = {}
    for strata in (1, 64):
        x = data.sample(64 * 600, generator=gen, dtype=torch.float64)
        loss = torch.stack([model.dsm(batch, time_sampling="importance", strata=strata, generator=gen).mean()
                            for batch in x.split(64)])
        assert abs(loss.mean().item() - objective) < 5 * loss.std().item() / math.sqrt(len(loss))
        means[strata] = loss
    assert means[64].var() < 0.8 * means[1].var()  # the part of the variance that t adds is gone
    with pytest.raises(ValueError, match="strata must divide n=64"):
        model.dsm(x[:64], strata=5)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generative_coefficients_are_finite_at_both_ends(name, parameterization, dtype):
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, parameterization).to(dtype)
    y = torch.randn(2, data.dim, dtype=dtype)
    for t in (0.0, sde.T):
        for lmbd in (0.0, 0.5, 1.0):
            assert torch.isfinite(model.mu(y, t, lmbd)).all()
            assert torch.isfinite(model.sigma(y, t, lmbd)).all()
            assert model.mu(y, t, lmbd).dtype == dtype


def test_lambda_family_interpolates_between_sde_and_ode():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "drift")
    y, t = torch.randn(5, 3, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    g, a, f = sde.g(y, t), model.drift(y, t), sde.f(y, t)
    torch.testing.assert_close(model.mu(y, t, 0.0), g * a - f)
    torch.testing.assert_close(model.mu(y, t, 1.0), 0.5 * g * a - f)
    torch.testing.assert_close(model.sigma(y, t, 1.0), torch.zeros_like(g))
    torch.testing.assert_close(model.sigma(y, t, 0.5), math.sqrt(0.5) * g)


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, y, t):
        return self.conv(y) * t[:, None, None, None]


def test_any_batch_size_and_training_through_the_losses():
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), TinyConvNet())
    x = torch.rand(1, 3, 4, 4)
    for loss in (model.dsm(x, time_sampling="importance"), -model.elbo(x, time_sampling="importance")):
        assert loss.shape == (1,)
        model.zero_grad()
        loss.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.elbo(x).shape == (1,)  # the default fits a proposal on this one image


def test_bad_input_raises_value_errors_naming_the_argument():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="lmbd"):
        model.mu(x, 0.5, lmbd=1.5)
    with pytest.raises(ValueError, match="lmbd"):
        model.sigma(x, 0.5, lmbd=-0.1)
    with pytest.raises(ValueError, match="parameterization"):
        sdeflow.PluginReverseSDE(sde, model.net, "x0")
    with pytest.raises(ValueError, match="time_sampling"):
        model.elbo(x, time_sampling="sobol")
    with pytest.raises(ValueError, match="time_sampling"):
        model.dsm(x, time_sampling="sobol")
    with pytest.raises(ValueError, match="probe"):
        model.elbo(x, probe="uniform")
    with pytest.raises(ValueError, match="divergence"):
        model.elbo(x, divergence="approx")
    with pytest.raises(ValueError, match="n_slices"):
        model.elbo(x, n_slices=0)
    with pytest.raises(ValueError, match="weighting"):
        model.dsm(x, weighting="snr")
    with pytest.raises(ValueError, match="order"):
        model.dsm(x, order=3)
    with pytest.raises(ValueError, match="second_order_weight"):
        model.dsm(x, order=2, second_order_weight=-1.0)
    with pytest.raises(ValueError, match="at most 64 dimensions"):
        model.dsm(torch.zeros(2, 65, dtype=torch.float64), order=2)
    with pytest.raises(ValueError, match="x"):
        model.elbo(torch.tensor([[0.0, float("nan"), 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="net must return"):
        sdeflow.PluginReverseSDE(sde, lambda_net(lambda y, t: y[:, :2])).dsm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sde"):
        sdeflow.PluginReverseSDE("vp", model.net)


def lambda_net(fn):
    class Net(torch.nn.Module):
        def forward(self, y, t):
            return fn(y, t)
    return Net()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data).cuda()
    x = data.sample(8, dtype=torch.float64).cuda()
    assert model.elbo(x, time_sampling="importance").is_cuda
    assert model.log_prob_ode(x).is_cuda


@pytest.mark.parametrize("name", list(SDES))
def test_denoising_forms_have_the_same_expectation_and_each_is_quiet_where_it_should_be(name):
    """h₀ (denoising), h₀ + w (with the control variate) and the Hutchinson form agree in mean; h₀ is
    the quietest at large t (ε̂ ≈ ε), and h₀ + w far quieter than h₀ at small t (ε̂ ≈ 0). (At small t
    the Hutchinson form is quieter still on this oracle, whose Jacobian is diagonal and constant.)"""
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, "drift")
    gen = torch.Generator().manual_seed(0)
    x = data.sample(1, generator=gen, dtype=torch.float64).repeat(20000, 1)
    for time, quiet, louder in ((0.8, "h0", ("h0+w", "hutchinson")), (1e-4, "h0+w", ("h0",))):
        t = torch.full((20000,), time, dtype=torch.float64)
        hutchinson = model.elbo_integrand(sde.sample(x, t, generator=gen), t, generator=gen)
        h0, w = model._denoising_terms(x, t, generator=gen)
        forms = {"hutchinson": hutchinson, "h0": h0, "h0+w": h0 + w}
        for form, values in forms.items():
            se = math.sqrt((hutchinson.var() + values.var()).item() / 20000)
            assert abs(hutchinson.mean() - values.mean()) < 5 * se, (time, form)
        assert all(forms[quiet].std() < 0.5 * forms[form].std() for form in louder), time
        assert abs(w.mean()) < 5 * w.std() / math.sqrt(20000)


def test_fitted_proposal_fits_the_control_variate_where_it_helps():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "drift")
    x = data.sample(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proposal = model.fit_time_proposal(x, generator=torch.Generator().manual_seed(1))
    assert proposal.t_min == pytest.approx(model.default_t_min())
    assert (proposal.control[:3] > 0.8).all() and (proposal.control[-3:].abs() < 0.3).all(), proposal.control
    restored = sdeflow.FittedTime.from_state_dict(proposal.state_dict())
    torch.testing.assert_close(restored.control, proposal.control)
    # A pilot pass in chunks of 7 (not dividing bins × examples) fits the same proposal up to its
    # noise (the draws fall differently into chunks).
    chunked = model.fit_time_proposal(x, chunk_size=7, generator=torch.Generator().manual_seed(1))
    assert (chunked.control[:3] > 0.8).all() and (chunked.control[-3:].abs() < 0.3).all(), chunked.control
    with pytest.raises(ValueError, match="chunk_size"):
        model.fit_time_proposal(x, chunk_size=0)
    with pytest.raises(ValueError, match="t_min"):
        model.elbo(x, t_min=sde.T)
    with pytest.raises(ValueError, match="t_min"):
        model.elbo(x, time_sampling=proposal, t_min=0.1)


@pytest.mark.parametrize("parameterization", ["score", "noise"])
def test_default_elbo_is_unbiased_in_every_parameterization(parameterization):
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, parameterization)
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    mean, se = _repeat_estimates(lambda xs: model.elbo(xs, generator=gen), x, 3000)
    assert (model.time_proposal.control != 0).any()  # the control variate is exercised
    expected = expected_truncated_elbo(sde, data, x, model.default_t_min())
    assert ((mean - expected).abs() < 5 * se + 1e-3).all()
