"""The ELBO and its time proposals: unbiased for the exact bound of Gaussian and mixture oracles."""

import json
import math

import pytest
import torch

import sdeflow
from sdeflow.likelihood.elbo import default_t_min, denoising_terms, elbo_integrand
from sdeflow.nets.oracles import GaussianMixture
from sdeflow.likelihood.statistics import tail_diagnostics
from oracle_helpers import SDES, OffsetNoiseNet, exact_model, expected_elbo, expected_truncated_elbo, gaussian


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
    mean, se = _repeat_estimates(lambda xs: sdeflow.elbo(model, xs, generator=gen, **options), x, 3000)
    expected = expected_truncated_elbo(sde, data, x, options.get("t_min", default_t_min(model.T)))
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
        to_zero = sdeflow.elbo(model, x[:1].repeat(20000, 1), time_sampling=time_sampling, t_min=0.0, generator=gen)
        assert tail_diagnostics(to_zero.detach())["heavy_tailed"], time_sampling
    values = sdeflow.elbo(model, x.repeat(3000, 1), generator=gen).reshape(3000, 4)
    expected = expected_truncated_elbo(sde, data, x, default_t_min(model.T), offset)
    mean, se = values.mean(0), values.std(0) / math.sqrt(3000)
    assert ((mean - expected).abs() < 5 * se + 1e-3).all(), (mean, expected, se)
    assert not any(tail_diagnostics(values[:, i])["heavy_tailed"] for i in range(4))
    # the offset costs what the closed form says: far more than the estimator's noise
    assert (expected_truncated_elbo(sde, data, x, default_t_min(model.T)) - expected).min() > 10 * se.max()

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
    values = [sdeflow.elbo(exact_model(sde, data, p), x, n_slices=2, time_sampling="importance",
                                             generator=torch.Generator().manual_seed(5))
              for p in PARAMETERIZATIONS]
    assert len(values) == 4
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=1e-6)

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
        hutchinson = elbo_integrand(model, sde.sample(x, t, generator=gen), t, generator=gen)
        h0, w = denoising_terms(model, x, t, generator=gen)
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
    proposal = sdeflow.fit_time_proposal(model, x, generator=torch.Generator().manual_seed(1))
    assert proposal.t_min == pytest.approx(default_t_min(model.T))
    assert (proposal.control[:3] > 0.8).all() and (proposal.control[-3:].abs() < 0.3).all(), proposal.control
    restored = sdeflow.EstimatorPlan.from_dict(json.loads(json.dumps(proposal.to_dict())))  # a value a JSON keeps
    for name in ("control", "alternative"):
        assert torch.equal(getattr(restored, name), getattr(proposal, name)), name
    for name in ("edges", "probs", "moments"):
        assert torch.equal(getattr(restored.proposal, name), getattr(proposal.proposal, name)), name
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(sdeflow.elbo(model, x, time_sampling=restored, n_slices=4, generator=gen_a),
                               sdeflow.elbo(model, x, time_sampling=proposal, n_slices=4, generator=gen_b))
    # A pilot pass in chunks of 7 (not dividing bins × examples) fits the same proposal up to its
    # noise (the draws fall differently into chunks).
    chunked = sdeflow.fit_time_proposal(model, x, chunk_size=7, generator=torch.Generator().manual_seed(1))
    assert (chunked.control[:3] > 0.8).all() and (chunked.control[-3:].abs() < 0.3).all(), chunked.control
    with pytest.raises(ValueError, match="chunk_size"):
        sdeflow.fit_time_proposal(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="t_min"):
        sdeflow.elbo(model, x, t_min=sde.T)
    with pytest.raises(ValueError, match="t_min"):
        sdeflow.elbo(model, x, time_sampling=proposal, t_min=0.1)

@pytest.mark.parametrize("parameterization", ["score", "noise"])
def test_default_elbo_is_unbiased_in_every_parameterization(parameterization):
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, parameterization)
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    mean, se = _repeat_estimates(lambda xs: sdeflow.elbo(model, xs, generator=gen), x, 3000)
    pilot = sdeflow.fit_time_proposal(model, x.repeat(3000, 1), generator=torch.Generator().manual_seed(1))
    assert (pilot.control != 0).any()  # the control variate is exercised
    expected = expected_truncated_elbo(sde, data, x, default_t_min(model.T))
    assert ((mean - expected).abs() < 5 * se + 1e-3).all()


def test_the_one_line_elbo_fits_its_proposal_once_per_model_state(monkeypatch):
    """elbo(model, x) in a loop over batches fits the proposal on the first and reuses it (the cheap path
    is the default path); a change of the weights, of t_min or another model fits again, and the
    model is never changed."""
    import importlib

    elbo_module = importlib.import_module("sdeflow.likelihood.elbo")  # the module; sdeflow.likelihood.elbo is the function
    from sdeflow.nets.mlp import MLP

    fits = []
    real = elbo_module.fit_time_proposal
    monkeypatch.setattr(elbo_module, "fit_time_proposal", lambda *a, **k: fits.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), MLP(dim=2, hidden=16, n_blocks=1), "noise").double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def batch():
        return torch.randn(8, 2, generator=gen, dtype=torch.float64)

    for _ in range(3):
        sdeflow.elbo(model, batch(), generator=gen)
    assert len(fits) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sdeflow.elbo(model, batch(), t_min=1e-3, generator=gen)
    assert len(fits) == 2
    with torch.no_grad():  # an optimizer step changes the weights in place
        next(model.parameters()).add_(0.01)
    sdeflow.elbo(model, batch(), t_min=1e-3, generator=gen)
    sdeflow.elbo(model, batch(), t_min=1e-3, generator=gen)
    assert len(fits) == 3
    sdeflow.elbo(exact_model(sdeflow.VPSDE(), gaussian(2), "noise"), batch(), generator=gen)
    assert len(fits) == 4
