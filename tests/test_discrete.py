"""The discrete-time bound, reverse variances and ancestral sampling against closed forms.

Gaussian data N(μ, diag s²) with the exact score: x̂_0(y_n) = E[x | y_n] = μ + k_n(y_n − m_n μ),
k_n = m_n s²/(m_n² s² + v_n), so x − x̂_0 = (1 − k_n m_n)(x − μ) − k_n √v_n ε and every term of the
bound is an expectation of a quadratic in Gaussian noise. The coefficients here are written from
their definitions (a_n = m_n/m_{n−1}, β_n = v_n − a_n² v_{n−1}, ...), not from the library's
cancellation-free forms.
"""

import json
import math

import pytest
import torch

import sdeflow
from sdeflow.data.transforms import TRANSFORMS, bits_per_dim
from sdeflow.discrete import (AnalyticVariance, LearnedVariance, PixelBins, discrete_bound,
                              estimate_analytic_variance, fit_step_proposal, forward_chain, hybrid_loss)
from sdeflow.nets.oracles import GaussianMixture
from sdeflow.samplers import ancestral_sample
from sdeflow.samplers.grids import time_grid
from oracle_helpers import _one_thread  # noqa: F401 (fixture)
from oracle_helpers import SDES, Z, assert_gaussian_moments, exact_model, expected_truncated_elbo, gaussian


# ---- the test's own closed forms ------------------------------------------------------------------
def _coefficients(sde, times):
    """Per step n = 1..N (index n): β_n, β̃_n, c^x_n, and m_n, v_n, from their definitions."""
    t = torch.cat([torch.zeros(1, dtype=torch.float64), torch.as_tensor(times, dtype=torch.float64)])
    m, v = sde.mean_weight(t), sde.var(t)
    a = torch.ones_like(m)
    a[1:] = m[1:] / m[:-1]
    beta = torch.zeros_like(m)
    beta[1:] = v[1:] - a[1:] ** 2 * v[:-1]
    beta_tilde, coef = torch.zeros_like(m), torch.zeros_like(m)
    beta_tilde[1:] = v[:-1] * beta[1:] / v[1:]
    coef[1:] = m[:-1] * beta[1:] / v[1:]
    return {"m": m, "v": v, "beta": beta, "beta_tilde": beta_tilde, "coef": coef}


def _data_error(data, x, m, v):
    """E_{y|x}[(x − x̂_0(y))²] per dimension, (B, D), for y ~ N(m x, v)."""
    mu, s2 = data.means[0], data.stds[0] ** 2
    k = m * s2 / (m ** 2 * s2 + v)
    return (1 - k * m) ** 2 * (x - mu) ** 2 + k ** 2 * v


def _posterior_var(data, m, v):
    """Var(x | y) per dimension, (D,)."""
    s2 = data.stds[0] ** 2
    return s2 * v / (m ** 2 * s2 + v)


def _expected_bound(sde, data, x, times, variance_of):
    """E[decoder log-prob], Σ_{n≥2} E[KL_n] and KL_prior, each (B,); ``variance_of(n, c)`` gives σ_n²."""
    c = _coefficients(sde, times)
    n_steps = len(times)
    var = variance_of(1, c)
    err = _data_error(data, x, c["m"][1], c["v"][1])
    decoder = (-0.5 * torch.log(2 * math.pi * var) - err / (2 * var)).sum(-1)
    steps = torch.zeros(x.shape[0], dtype=torch.float64)
    for n in range(2, n_steps + 1):
        var = variance_of(n, c)
        ratio = c["beta_tilde"][n] / var
        err = c["coef"][n] ** 2 * _data_error(data, x, c["m"][n], c["v"][n])
        steps += 0.5 * (ratio - 1 - torch.log(ratio) + err / var).expand_as(x).sum(-1)
    m, v, prior_var = c["m"][-1], c["v"][-1], sde.prior_var
    prior = 0.5 * ((v + m ** 2 * x ** 2) / prior_var - 1 - torch.log(v / prior_var)).sum(-1)
    return decoder, steps, prior


def _optimal_var(data, n, c):
    """The bound-optimal isotropic σ_n² for the exact mean: β̃_n + (c^x_n)²·mean_d Var(x_d | y_n)."""
    return c["beta_tilde"][n] + c["coef"][n] ** 2 * _posterior_var(data, c["m"][n], c["v"][n]).mean()


def _exact_gamma(data, sde, times):
    """Γ(t) = E‖ε̂‖²/D exactly: ε̂ = √v (y − mμ)/(m²s² + v) per dimension has E ε̂² = v/(m²s² + v)."""
    t = torch.as_tensor(times, dtype=torch.float64)
    m, v = sde.mean_weight(t)[:, None], sde.var(t)[:, None]
    return (v / (m ** 2 * data.stds[0] ** 2 + v)).mean(-1)


class ConstantInterpolation(torch.nn.Module):
    """v(y, t) = a fixed vector (D,) for every example."""

    def __init__(self, v):
        super().__init__()
        self.v = torch.as_tensor(v, dtype=torch.float64)

    def forward(self, y, t):
        return self.v.expand_as(y).to(y.dtype)


def _variance_cases(data, sde, times):
    """(variance given to the library, σ_n² of the closed form) for every choice."""
    gamma = _exact_gamma(data, sde, times)
    analytic = AnalyticVariance(torch.as_tensor(times, dtype=torch.float64), gamma, torch.zeros_like(gamma))
    v = torch.linspace(-0.2, 1.1, data.dim, dtype=torch.float64)

    def decoder_small(c):
        return c["beta_tilde"][2]

    return {
        "posterior": ("posterior", lambda n, c: c["beta_tilde"][n] if n > 1 else decoder_small(c)),
        "step": ("step", lambda n, c: c["beta"][n] if n > 1 else decoder_small(c)),
        "analytic": (analytic, lambda n, c: _optimal_var(data, n, c)),
        "learned": (LearnedVariance(ConstantInterpolation(v)),
                    lambda n, c: torch.exp(v * torch.log(c["beta"][n])
                                           + (1 - v) * torch.log(c["beta_tilde"][n] if n > 1 else decoder_small(c)))),
    }


def _grids(sde):
    return {"ddpm": sde.T * torch.arange(1, 7, dtype=torch.float64) / 6,
            "logsnr": time_grid(sde, 5, "logsnr", t_min=1e-2 * sde.T).flip(0)}


def _replicate(x, repeats):
    return x.repeat_interleave(repeats, dim=0)


def _per_point(values, repeats):
    """Mean and standard error over the replicates of each point."""
    values = values.reshape(-1, repeats)
    return values.mean(1), values.std(1) / math.sqrt(repeats)


# ---- the bound ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("grid", ["ddpm", "logsnr"])
@pytest.mark.parametrize("choice", ["posterior", "step", "analytic", "learned"])
def test_bound_equals_its_closed_form_with_every_variance(name, grid, choice):
    sde, data = SDES[name](), gaussian(3)
    times = _grids(sde)[grid]
    model = exact_model(sde, data, "noise")
    variance, variance_of = _variance_cases(data, sde, times)[choice]
    x = data.sample(3, torch.Generator().manual_seed(1), torch.float64)
    repeats = 400
    bound = discrete_bound(model, _replicate(x, repeats), forward_chain(sde, times=times), variance,
                           generator=torch.Generator().manual_seed(2))
    decoder, steps, prior = _expected_bound(sde, data, x, times, variance_of)
    for got, expected in ((bound.decoder_log_prob, decoder), (bound.step_kl, steps),
                          (bound.log_prob, decoder - steps - prior)):
        mean, se = _per_point(got, repeats)
        assert ((mean - expected).abs() < Z * se + 1e-9).all(), (mean, expected, se)
    assert torch.allclose(bound.prior_kl, _replicate(prior, repeats), rtol=1e-12, atol=1e-12)
    assert bound.nfe == len(times) and not bound.discrete


@pytest.mark.parametrize("proposal", ["uniform", "fitted"])
def test_sampled_steps_are_unbiased_with_a_standard_error_that_covers_them(proposal):
    sde, data = SDES["vp"](), gaussian(2)
    chain = forward_chain(sde, chain_steps=12)
    model = exact_model(sde, data)
    gen = torch.Generator().manual_seed(3)
    step_proposal = None
    if proposal == "fitted":
        step_proposal = fit_step_proposal(model, data.sample(256, gen, torch.float64), chain, "step", generator=gen)
        assert step_proposal[:2].eq(0).all() and torch.isclose(step_proposal.sum(), torch.tensor(1.0, dtype=torch.float64))
    x = data.sample(1, gen, torch.float64)
    repeats = 4000
    bound = discrete_bound(model, _replicate(x, repeats), chain, "step", n_sampled_steps=4,
                           step_proposal=step_proposal, generator=gen)
    _, expected, _ = _expected_bound(sde, data, x, chain.times[1:], lambda n, c: c["beta"][n])
    mean, se = _per_point(bound.step_kl, repeats)
    assert (mean - expected).abs() < Z * se, (mean, expected, se)
    # The reported per-example error is that of the 4 draws: its mean square is their variance / 4.
    spread, reported = bound.step_kl.var(), bound.step_kl_se.pow(2).mean()
    spread_se = ((bound.step_kl - bound.step_kl.mean()).pow(4).mean() - spread ** 2).sqrt() / math.sqrt(repeats)
    reported_se = bound.step_kl_se.pow(2).std() / math.sqrt(repeats)
    assert (spread - reported).abs() < Z * (spread_se ** 2 + reported_se ** 2).sqrt()
    assert bound.nfe == 5


def test_discrete_bound_approaches_the_continuous_elbo_at_first_order():
    """With β̃ and a grid uniform in log-SNR from a fixed t_1 to T, the bound on E log p(y_1),
    −Σ_{n≥2} KL_n − KL_prior − H[q(y_1|x)], converges to the continuous ELBO on [t_1, T] (exact here:
    E log q_{t_1}(y) + the prior's mismatch); each step's KL is O(h²) beyond the continuous rate, so
    the gap is O(1/N)."""
    for name in SDES:
        sde, data = SDES[name](), gaussian(2)
        x = data.sample(3, torch.Generator().manual_seed(4), torch.float64)
        t_1 = 1e-3 * sde.T
        m_1, v_1 = (f(torch.tensor(t_1, dtype=torch.float64)) for f in (sde.mean_weight, sde.var))
        continuous = expected_truncated_elbo(sde, data, x, t_1) - data.dim * torch.log(m_1)
        sizes, gaps = (64, 128, 256, 512), []
        for n_steps in sizes:
            times = time_grid(sde, n_steps - 1, "logsnr", t_min=t_1).flip(0)
            _, steps, prior = _expected_bound(sde, data, x, times, lambda n, c: c["beta_tilde"][n])
            discrete = -steps - prior - 0.5 * data.dim * torch.log(2 * math.pi * math.e * v_1)
            gaps.append(float((continuous - discrete).abs().max()))
        slope = torch.linalg.lstsq(torch.stack([torch.log(torch.tensor(sizes, dtype=torch.float64)),
                                                torch.ones(len(sizes), dtype=torch.float64)], 1),
                                   torch.log(torch.tensor(gaps, dtype=torch.float64))[:, None]).solution[0, 0]
        assert abs(slope + 1) < 0.25, (name, gaps, float(slope))


# ---- reverse variances --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_analytic_variance_is_the_exact_optimal_variance(name):
    sde, data = SDES[name](), gaussian(3)
    chain = forward_chain(sde, chain_steps=10)
    gen = torch.Generator().manual_seed(5)
    analytic = estimate_analytic_variance(exact_model(sde, data, "score"), data.sample(20_000, gen, torch.float64),
                                          chain, generator=gen, batch_size=5000)
    c = _coefficients(sde, chain.times[1:])
    got = analytic.variances(chain)
    for n in range(1, chain.chain_steps + 1):
        expected = _optimal_var(data, n, c)
        # σ² is linear in Γ with slope (c^x)² v/m²; Γ's estimate carries its standard error.
        tolerance = Z * c["coef"][n] ** 2 * c["v"][n] / c["m"][n] ** 2 * analytic.gamma_se[n - 1]
        assert abs(got[n] - expected) < tolerance, (n, float(got[n]), float(expected), float(tolerance))
    # A value to keep: through JSON and back, and onto a sub-grid of its times (exact there).
    restored = AnalyticVariance.from_state(json.loads(json.dumps(analytic.to_state())))
    assert torch.equal(restored.variances(chain), got)
    coarse = forward_chain(sde, times=chain.times[2::2])
    assert torch.allclose(restored.variances(coarse)[1:], _exact_sub_grid(analytic, coarse), rtol=1e-12)


def _exact_sub_grid(analytic, chain):
    """σ² on ``chain`` from Γ read off at its times, which are among the table's."""
    index = [int(torch.argmin((analytic.times - t).abs())) for t in chain.times[1:]]
    gamma = analytic.gamma[index].clamp(0, 1)
    return (chain.posterior_var + chain.posterior_data_coef ** 2 * chain.var / chain.mean_weight ** 2
            * torch.cat([torch.zeros(1, dtype=torch.float64), 1 - gamma]))[1:]


class StepTable(torch.nn.Module):
    """v(y, t) = a learned value per step of a DDPM grid of ``n_steps`` (one per example, all dims)."""

    def __init__(self, sde, n_steps):
        super().__init__()
        self.T, self.n_steps = sde.T, n_steps
        self.v = torch.nn.Parameter(torch.zeros(n_steps + 1, dtype=torch.float64))

    def forward(self, y, t):
        return self.v[torch.round(t.double() / self.T * self.n_steps).long()][:, None].expand_as(y)


class OracleWithHead(torch.nn.Module):
    """The exact ε̂ and, beside it, a :class:`StepTable`'s v as the raw channels r = 2v − 1 of a network
    with a variance head (improved DDPM's layout, :class:`sdeflow.nets.MeanAndVariance`)."""

    def __init__(self, oracle, table):
        super().__init__()
        self.oracle, self.table = oracle, table

    def forward(self, y, t):
        return torch.cat([self.oracle(y, t), 2 * self.table(y, t) - 1], dim=1)


def _learned_variance_setup(sde, data, kind):
    """(model, the StepTable of its variance, loss(x, generator)) for the variance's two training paths:
    a network of its own trained by the hybrid loss, or the model's own head trained by the objective
    of ``sdeflow train`` (DSM for the mean plus the bound's terms)."""
    from sdeflow.engine.loop import DSMObjective
    from sdeflow.nets import MeanAndVariance

    exact, table = exact_model(sde, data, "noise"), StepTable(sde, 8)
    if kind == "hybrid loss":
        variance, chain = LearnedVariance(table), forward_chain(sde, chain_steps=8)
        return exact, table, lambda x, gen: hybrid_loss(exact, variance, x, chain, generator=gen).mean()
    model = sdeflow.PluginReverseSDE(sde, MeanAndVariance(OracleWithHead(exact.net, table)), "noise")
    objective = DSMObjective(model, sdeflow.TrainConfig(steps=1, batch_size=1, chain_steps=8, vlb_weight=1.0))
    return model, table, objective


@pytest.mark.parametrize("kind", ["hybrid loss", "the model's head by the training objective"])
def test_learned_variance_converges_to_the_optimal_variance(kind):
    """Isotropic Gaussian data, so that the per-element optimum is the isotropic one of Analytic-DPM.
    The exact mean has no parameters: only L_vlb moves the variance, whose stationary point is
    σ_n² = β̃_n + E[(μ̃ − μ_θ)²]. Averaged over the last iterates, the learned σ_n² is that mean of
    V_n χ²₁ draws (V_n = σ*² − β̃_n) over the M of them seen, standard error V_n √(2/M)."""
    sde = SDES["vp"]()
    data = GaussianMixture.gaussian(torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.5]))
    chain = forward_chain(sde, chain_steps=8)
    _, table, loss_of = _learned_variance_setup(sde, data, kind)
    # The last steps' gradients are ~1e-10 (β̃ ≈ β there): Adam's eps must not swamp them.
    optimizer = torch.optim.Adam(table.parameters(), lr=0.05, eps=1e-30)
    gen = torch.Generator().manual_seed(6)
    iterations, window, batch = 400, 200, 1024
    # Adam moves every v by about lr per iteration whatever its gradient: the rate decays to 0 over the
    # window, so that the optimizer's own jitter dies out and the sampling error is what is left.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 1.0 if i < iterations - window else (iterations - i) / window)
    average = torch.zeros(chain.chain_steps + 1, dtype=torch.float64)
    for i in range(iterations):
        loss = loss_of(data.sample(batch, gen, torch.float64), gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if i >= iterations - window:
            average += table.v.detach() / window
    c = _coefficients(sde, chain.times[1:])
    seen = window * batch / chain.chain_steps * data.dim
    for n in range(1, chain.chain_steps + 1):
        low = torch.log(c["beta_tilde"][n] if n > 1 else c["beta_tilde"][2])
        learned = torch.exp(average[n] * torch.log(c["beta"][n]) + (1 - average[n]) * low)
        optimal = _optimal_var(data, n, c)
        spread = (optimal - (c["beta_tilde"][n] if n > 1 else 0.0)) * math.sqrt(2 / seen)
        assert abs(learned - optimal) < Z * spread, (n, float(learned), float(optimal), float(spread))


def test_a_variance_head_shares_one_evaluation_with_the_mean_and_learns_from_the_bound_alone():
    """With the model's own head, ε̂ and σ² come from one network evaluation, equal to the model's and
    the LearnedVariance's own; ancestral sampling costs one evaluation per step; the bound's terms
    reach the variance's parameters and never the mean's; a model without a head is refused."""
    from sdeflow.discrete import noise_and_variance, variance_loss

    sde, data = SDES["vp"](), gaussian(2)
    model, table, _ = _learned_variance_setup(sde, data, "head")
    with torch.no_grad():
        table.v.copy_(torch.linspace(-0.3, 1.2, 9, dtype=torch.float64))
    oracle, variance = model.net.net.oracle, LearnedVariance.of(model)
    chain, gen = forward_chain(sde, chain_steps=8), torch.Generator().manual_seed(0)
    y = data.sample(5, gen, torch.float64)
    n = torch.tensor([1, 2, 4, 8, 8])
    t = chain.times[n]
    before = oracle.calls
    eps_hat, var = noise_and_variance(model, variance, chain, n, y, t)
    assert oracle.calls == before + 1
    torch.testing.assert_close(eps_hat, model.predicted_noise(y, t), rtol=0, atol=0)
    torch.testing.assert_close(var, variance.variance(chain, n, y), rtol=0, atol=0)
    own_table = LearnedVariance(lambda_module(lambda y_, t_: table(y_, t_)))
    torch.testing.assert_close(var, own_table.variance(chain, n, y), rtol=0, atol=0)
    before = oracle.calls
    ancestral_sample(model, variance, 8, (6, 2), generator=gen, dtype=torch.float64)
    assert oracle.calls == before + 8
    mean_weight = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    scaled = sdeflow.PluginReverseSDE(sde, sdeflow.nets.MeanAndVariance(lambda_module(
        lambda y_, t_: torch.cat([mean_weight * oracle(y_, t_), 2 * table(y_, t_) - 1], dim=1))), "noise")
    variance_loss(scaled, LearnedVariance.of(scaled), y, chain, generator=gen).sum().backward()
    assert (mean_weight.grad is None or mean_weight.grad == 0) and table.v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned_variance"):
        LearnedVariance.of(exact_model(sde, data, "noise"))


class lambda_module(torch.nn.Module):  # noqa: N801 (a module made of a function, for the test above)
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y, t):
        return self.fn(y, t)


def test_the_analytic_variance_gives_the_best_expected_bound():
    """Over the data, the analytic variance maximizes every step's expected term (it is isotropic, so
    for one x another choice may do better): its expected bound is at least those of β̃ and β. Every
    term is quadratic in each x_i alone, so the average over x = μ ± s (per dimension) is the exact
    expectation over the data."""
    for name in SDES:
        sde, data = SDES[name](), gaussian(3)
        times = _grids(sde)["ddpm"]
        x = torch.stack([data.means[0] + data.stds[0], data.means[0] - data.stds[0]])
        expected = {}
        for choice, (_, variance_of) in _variance_cases(data, sde, times).items():
            decoder, steps, prior = _expected_bound(sde, data, x, times, variance_of)
            expected[choice] = float((decoder - steps - prior).mean())
        assert expected["analytic"] >= max(expected["posterior"], expected["step"]), (name, expected)


# ---- the decoder over pixel bins ----------------------------------------------------------------------
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_decoder_probabilities_sum_to_one_over_the_256_bins(transform):
    bins = PixelBins(transform)
    levels = torch.arange(256, dtype=torch.uint8)[:, None]
    x = bins.centre(levels)
    assert torch.equal(bins.level(x), levels.long())
    for mean, var in ((float(x.median()), 1e-4), (float(x[3]), 1e-2), (float(x[-1]) + 5.0, 4.0), (-40.0, 1e-6)):
        log_p = bins.log_prob(x, torch.full_like(x, mean), torch.tensor(var, dtype=torch.float64))
        assert torch.isclose(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
        # and each mass is the normal's between the bin's edges
        normal = torch.distributions.Normal(mean, math.sqrt(var))
        direct = normal.cdf(bins.edges[1:]) - normal.cdf(bins.edges[:-1])
        assert torch.allclose(log_p.exp(), direct, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_decoders_gradient_is_finite_in_the_outer_bins(transform):
    """Levels 0 and 255 own half-lines: their masses and the gradients through the mean and a learned
    variance stay finite (an infinite edge divided by σ once made them NaN in training)."""
    bins = PixelBins(transform)
    x = bins.centre(torch.tensor([[0, 255, 128]], dtype=torch.uint8))
    mean = (x + 0.01).requires_grad_()
    var = torch.full_like(x, 1e-3).requires_grad_()
    log_prob = bins.log_prob(x, mean, var)
    log_prob.sum().backward()
    assert torch.isfinite(log_prob).all() and torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


def test_bits_per_dim_of_the_discrete_bound_are_those_of_the_transforms_module():
    sde = SDES["vp"]()
    bins = PixelBins("centered")
    images = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    model = exact_model(sde, GaussianMixture.gaussian(torch.zeros(3), torch.full((3,), 0.5)), "noise")
    bound = discrete_bound(model, bins.centre(images), forward_chain(sde, chain_steps=20), "posterior", bins=bins,
                           generator=torch.Generator().manual_seed(9))
    assert bound.discrete and (bound.log_prob < 0).all()
    bpd = bound.bits_per_dim()
    assert torch.allclose(bpd, -bound.log_prob / (3 * math.log(2)))
    assert torch.allclose(bpd, bits_per_dim(bound.log_prob, torch.full((5,), 3 * math.log(256.0), dtype=torch.float64), 3))
    continuous = discrete_bound(model, bins.centre(images), forward_chain(sde, chain_steps=20))
    with pytest.raises(ValueError, match="discretized decoder"):
        continuous.bits_per_dim()


# ---- ancestral sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("choice", ["posterior", "step", "analytic", "learned"])
def test_ancestral_samples_have_the_data_law(name, choice):
    sde, data = SDES[name](), gaussian(2)
    n_steps = 400
    times = forward_chain(sde, chain_steps=n_steps).times[1:]
    variance, _ = _variance_cases(data, sde, times)[choice]
    model = exact_model(sde, data, "noise")
    calls = []
    x = ancestral_sample(model, variance, n_steps, (4000, 2), generator=torch.Generator().manual_seed(10),
                         callback=calls.append, dtype=torch.float64)
    assert_gaussian_moments(x, data)
    assert len(calls) == n_steps == model.net.calls and calls[-1]["t"] == 0


@pytest.mark.parametrize("choice", ["step", "analytic", "learned"])
def test_ancestral_steps_on_a_respaced_grid_keep_the_data_law(choice):
    """The "ancestral" sampler of sdeflow.samplers on a grid other than DDPM's (quadratic in t, as
    improved DDPM samples with respaced steps): each step's variance is taken on that step."""
    sde, data = SDES["vp"](), gaussian(2)
    variance, _ = _variance_cases(data, sde, forward_chain(sde, chain_steps=400).times[1:])[choice]
    settings = sdeflow.SamplerSettings("ancestral", n_steps=200, grid="quadratic", t_min=0.0,
                                       options={"variance": variance})
    x = sdeflow.sample(exact_model(sde, data, "noise"), (4000, 2), settings,
                       generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert_gaussian_moments(x, data)


def test_a_seed_reproduces_the_samples_and_bad_input_is_refused():
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    draw = lambda: ancestral_sample(model, "step", 5, (3, 2), generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(draw(), draw())
    chain = forward_chain(sde, chain_steps=4)
    x = data.sample(3, torch.Generator().manual_seed(0), torch.float64)
    cases = [
        (lambda: forward_chain(sde), "exactly one"),
        (lambda: forward_chain(sde, chain_steps=0), "n_steps"),
        (lambda: forward_chain(sde, times=[0.5, 0.2, 1.0]), "times"),
        (lambda: forward_chain(sde, times=[0.5, 0.9]), "times"),
        (lambda: discrete_bound(model, x, chain, "fixedlarge"), "variance"),
        (lambda: discrete_bound(model, x, chain, n_sampled_steps=0), "n_sampled_steps"),
        (lambda: discrete_bound(model, x, chain, step_proposal=torch.ones(5)), "n_sampled_steps"),
        (lambda: discrete_bound(model, x, chain, n_sampled_steps=2, step_proposal=torch.ones(5)), "step_proposal"),
        (lambda: discrete_bound(model, x, chain, bins="logit"), "bins"),
        (lambda: discrete_bound(model, x * math.nan, chain), "x"),
        (lambda: PixelBins("sigmoid"), "transform"),
        (lambda: AnalyticVariance.from_state({"times": [0.1]}), "gamma"),
        (lambda: hybrid_loss(model, "posterior", x, chain), "variance_net"),
        (lambda: ancestral_sample(model, "large", 5, (3, 2)), "variance"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_a_network_in_float32_on_images_runs_every_path(device):
    """A float32 MLP on 8-bit "images" in logit space: bounds finite in bits/dim, gradients through
    the discretized decoder finite, everything on the device."""
    from sdeflow.nets.mlp import MLP

    sde = SDES["vp"]()
    model = sdeflow.PluginReverseSDE(sde, MLP(dim=3), "noise").to(device)
    bins, gen = PixelBins("logit"), torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (6, 3), dtype=torch.uint8, device=device)
    images[0, 0], images[0, 1] = 0, 255  # the outer bins, whose far edges are infinite
    x, chain = bins.centre(images).float(), forward_chain(sde, chain_steps=12)
    analytic = estimate_analytic_variance(model, x, chain, generator=gen)
    for variance in ("posterior", analytic):
        for sampled in (None, 3):
            bound = discrete_bound(model, x, chain, variance, bins=bins, n_sampled_steps=sampled, generator=gen)
            assert bound.log_prob.device.type == device and torch.isfinite(bound.bits_per_dim()).all()
    learned = LearnedVariance(MLP(dim=3)).to(device)
    hybrid_loss(model, learned, x, chain, bins=bins, generator=gen).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in learned.parameters() if p.grad is not None)
    assert ancestral_sample(model, learned, 5, (4, 3), generator=gen).device.type == device
