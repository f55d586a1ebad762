import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from sdeflow.likelihood.plans import EstimatorPlan, IntegrandForms, fit_proposal
from sdeflow.likelihood.time_proposals import FittedTime, ImportanceTime, UniformTime
from oracle_helpers import SDES


def _proposals(sde, t_min=0.0):
    fitted = fit_proposal(lambda t: torch.exp(-((t - 0.3) / 0.05) ** 2)[:, None] + 0.01, sde, n_bins=16,
                            n_per_bin=4, t_min=t_min, generator=torch.Generator().manual_seed(0), dtype=torch.float64).proposal
    return {"uniform": UniformTime(sde.T, t_min), "importance": ImportanceTime(sde, t_min=t_min), "fitted": fitted}


def _integral(f, sde, breaks, t_min=0.0):
    """Integrate f over [t_min, T] in float64, splitting at the points where it has kinks."""
    points = sorted({t_min, *[float(b) for b in breaks], sde.T})
    return sum(integrate.quad(f, a, b, limit=200)[0] for a, b in zip(points[:-1], points[1:]))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("kind", ["uniform", "importance", "fitted"])
@pytest.mark.parametrize("t_min", [0.0, 0.01])
def test_density_integrates_to_one_and_sampler_matches_cdf(name, kind, t_min):
    sde = SDES[name]()
    proposal = _proposals(sde, t_min)[kind]
    assert proposal.t_min == t_min
    density = lambda t: float(proposal.density(torch.tensor([t], dtype=torch.float64)))
    breaks = proposal.edges.tolist() if kind == "fitted" else [getattr(proposal, "t_eps", 0.5)]
    assert _integral(density, sde, breaks, t_min) == pytest.approx(1.0, abs=1e-6)

    t, q = proposal.sample(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (t > 0).all() and (t >= t_min).all() and (t <= sde.T).all()
    torch.testing.assert_close(q, proposal.density(t))
    assert stats.kstest(t.numpy(), lambda s: _cdf(proposal, s)).pvalue > 0.01


def _cdf(proposal, s):
    """The CDF in closed form: t/T, ImportanceTime.cdf (checked against quadrature below), or the
    piecewise-linear CDF of a histogram."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if isinstance(proposal, UniformTime):
        out = (s - proposal.t_min) / (proposal.T - proposal.t_min)
    elif isinstance(proposal, ImportanceTime):
        out = proposal.cdf(s)
    else:
        edges, cum = proposal.edges, torch.cat([torch.zeros(1, dtype=torch.float64), proposal.probs.cumsum(0)])
        out = torch.from_numpy(np.interp(s.numpy(), edges.numpy(), cum.numpy()))
    return out.numpy()


def _integral_between(f, a, b, breaks):
    points = [a, *breaks, b]
    return sum(integrate.quad(f, u, v, limit=100)[0] for u, v in zip(points[:-1], points[1:]) if v > u)


@pytest.mark.parametrize("name", list(SDES))
def test_importance_cdf_is_exact(name):
    sde = SDES[name]()
    proposal = ImportanceTime(sde)
    t = torch.tensor([0.0, proposal.t_eps / 2, proposal.t_eps, 0.1, 0.5, sde.T], dtype=torch.float64)
    cdf = proposal.cdf(t)
    assert cdf[0] == 0 and cdf[-1] == pytest.approx(1.0, abs=1e-12)
    numeric = [_integral_between(lambda s: float(proposal.density(torch.tensor([s], dtype=torch.float64))),
                                 0.0, float(p), [proposal.t_eps] if p > proposal.t_eps else []) for p in t]
    torch.testing.assert_close(cdf, torch.tensor(numeric, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(proposal._inverse_cdf(cdf[1:]), t[1:], rtol=1e-7, atol=1e-9)


def test_importance_is_uniform_in_log_snr():
    """Above t_ε, q ∝ g²/v = −λ', so λ(t) of the draws is uniform."""
    sde = SDES["vp"]()
    proposal = ImportanceTime(sde)
    t, _ = proposal.sample(20000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = sde.log_snr(t[t > proposal.t_eps])
    lo, hi = float(sde.log_snr(torch.tensor(sde.T, dtype=torch.float64))), float(sde.log_snr(torch.tensor(proposal.t_eps, dtype=torch.float64)))
    assert stats.kstest(lam.numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 0.01


@pytest.mark.parametrize("kind", ["uniform", "importance", "fitted"])
def test_weighted_estimate_is_unbiased(kind):
    """E_q[h(t)/q(t)] = ∫ h for an integrand with a known integral."""
    sde = SDES["vp"]()
    proposal = _proposals(sde)[kind]
    t, q = proposal.sample(400000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = torch.exp(-((t - 0.3) / 0.05) ** 2)
    exact = 0.05 * math.sqrt(math.pi) * 0.5 * (math.erf(0.7 / 0.05) + math.erf(0.3 / 0.05))
    est = h / q
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(len(est))


@pytest.mark.parametrize("kind", ["uniform", "importance", "fitted"])
def test_stratified_draws_keep_to_their_quantiles_and_stay_unbiased_with_less_variance(kind):
    """With strata K, block k of the draws has CDF values in [b_k, b_{k+1}) (equal quantiles, or the
    fitted proposal's own bounds) and q̃ = q / (K (b_{k+1} − b_k)); the block average of h/q̃ is unbiased
    for ∫h and, on a peaked integrand, far less variable than K independent draws."""
    sde = SDES["vp"]()
    proposal = _proposals(sde)[kind]
    if kind == "fitted":  # its own strata suit its pilot's integrand, not this h: see the next test
        proposal = FittedTime(proposal.edges, proposal.probs)
    K, n = 8, 40000
    t, q = proposal.sample(K * n, generator=torch.Generator().manual_seed(4), dtype=torch.float64, strata=K)
    bounds = proposal.strata_bounds(K)
    assert bounds[0] == 0 and bounds[-1] == 1 and (bounds[1:] > bounds[:-1]).all()
    weights = (K * (bounds[1:] - bounds[:-1])).repeat_interleave(n)
    torch.testing.assert_close(q, proposal.density(t) / weights)
    u = torch.from_numpy(_cdf(proposal, t)).reshape(K, n)
    assert (u >= bounds[:-1, None] - 1e-9).all() and (u <= bounds[1:, None] + 1e-9).all()
    h = torch.exp(-((t - 0.3) / 0.05) ** 2)
    exact = 0.05 * math.sqrt(math.pi) * 0.5 * (math.erf(0.7 / 0.05) + math.erf(0.3 / 0.05))
    stratified = (h / q).reshape(K, n).mean(0)
    assert abs(stratified.mean().item() - exact) < 4 * stratified.std().item() / math.sqrt(n)
    t_ind, q_ind = proposal.sample(K * n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    independent = (torch.exp(-((t_ind - 0.3) / 0.05) ** 2) / q_ind).reshape(K, n).mean(0)
    assert stratified.var() < 0.8 * independent.var()


def test_fitted_strata_give_a_noisy_low_mean_region_a_draw_of_its_own():
    """An integrand like an ε network's ELBO near t_min: small in mean but noisy on [t_min, 10⁻³],
    large and quiet beyond. With two draws per estimate, the fitted strata separate the two regions
    and cut the variance well below equal-quantile strata of the same proposal, unbiasedly."""
    sde = SDES["vp"]()
    gen = torch.Generator().manual_seed(0)

    def integrand(t):
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return torch.where(t < 1e-3, 0.05 * noise / t, 2.0 + 0.2 * noise)

    fitted = fit_proposal(integrand, sde, n_bins=24, n_per_bin=200, t_min=1e-5, generator=gen,
                          dtype=torch.float64).proposal
    plain = FittedTime(fitted.edges, fitted.probs)  # no moments: equal quantiles
    exact = 2.0 * (sde.T - 1e-3)
    variances = []
    for proposal in (fitted, plain):
        t, q = proposal.sample(2 * 20000, generator=gen, dtype=torch.float64, strata=2)
        estimates = (integrand(t) / q).reshape(2, -1).mean(0)
        assert abs(estimates.mean() - exact) < 5 * estimates.std() / math.sqrt(20000)
        variances.append(estimates.var())
    cut = float(fitted.strata_bounds(2)[1])
    assert abs(cut - float(fitted._cum[torch.searchsorted(fitted.edges, torch.tensor(1e-3, dtype=torch.float64))])) < 0.05
    assert variances[0] < 0.5 * variances[1], variances


@pytest.mark.parametrize("strata", [0, 3, 2.5])
def test_strata_must_divide_the_number_of_draws(strata):
    with pytest.raises(ValueError, match="strata"):
        ImportanceTime(SDES["vp"]()).sample(8, strata=strata)


def test_fitted_proposal_follows_the_integrand():
    sde = SDES["vp"]()
    fitted = _proposals(sde)["fitted"]
    near, far = fitted.density(torch.tensor([0.3, 0.8], dtype=torch.float64))
    assert near > 20 * far


def test_fitted_rejects_bad_arguments():
    edges = torch.tensor([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="probs"):
        FittedTime(edges, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="edges"):
        FittedTime(torch.tensor([-0.1, 0.5, 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="edges"):
        FittedTime(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="control"):
        EstimatorPlan(FittedTime(edges, torch.tensor([0.5, 0.5])), control=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="alternative"):
        EstimatorPlan(FittedTime(edges, torch.tensor([0.5, 0.5])), alternative=torch.tensor([True]))
    with pytest.raises(ValueError, match="proposal must be a FittedTime"):
        EstimatorPlan(UniformTime(1.0))
    assert FittedTime(torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.5, 0.5])).t_min == pytest.approx(0.1)
    with pytest.raises(ValueError, match="t_eps"):
        ImportanceTime(SDES["vp"](), t_eps=2.0)
    with pytest.raises(ValueError, match="t_eps"):
        ImportanceTime(SDES["vp"](), t_eps=0.01, t_min=0.1)
    with pytest.raises(ValueError, match="t_min"):
        UniformTime(1.0, t_min=1.0)


def test_fitted_control_coefficient_minimises_the_variance():
    """With h = a + β·w + noise and w a zero-mean control variate, the fitted coefficient is −β in
    every bin, and the proposal is sized by what is left (h − βw)."""
    sde = SDES["vp"]()
    gen = torch.Generator().manual_seed(0)

    def integrand(t):
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return IntegrandForms(1.0 + 3.0 * w + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64),
                              control=w)

    fitted = fit_proposal(integrand, sde, n_bins=8, n_per_bin=400, t_min=0.01, generator=gen,
                            dtype=torch.float64)
    torch.testing.assert_close(fitted.control, torch.full((8,), -3.0, dtype=torch.float64), atol=0.01, rtol=0)
    t = torch.tensor([0.02, 0.5], dtype=torch.float64)
    torch.testing.assert_close(fitted.control_at(t), torch.full((2,), -3.0, dtype=torch.float64), atol=0.01, rtol=0)
    restored = EstimatorPlan.from_dict(fitted.to_dict())
    torch.testing.assert_close(restored.control, fitted.control)
    torch.testing.assert_close(restored.proposal.density(t), fitted.proposal.density(t))
