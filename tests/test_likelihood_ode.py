"""The probability-flow ODE (``sdeflow.likelihood.ode``) against closed forms: a diagonal Gaussian under a linear
SDE has an exact score (``ExactScoreNet``) and an exact probability-flow map."""

import math

import pytest
import torch

import sdeflow
from sdeflow.likelihood.ode import probability_flow_velocity
from sdeflow.samplers import Trace
from oracle_helpers import _one_thread  # noqa: F401 (fixture)
from oracle_helpers import (SDES, assert_gaussian_moments, exact_flow, exact_model, expected_ode_log_prob, gaussian,
                            true_marginal_T)

N_SAMPLES = 4000




# ---- sample_ode: distribution and order -----------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_sample_ode_has_the_data_mean_and_covariance(name):
    sde, data = SDES[name](), gaussian(2)
    model = exact_model(sde, data)
    gen = torch.Generator().manual_seed(0)
    x_T = true_marginal_T(sde, data, N_SAMPLES, gen)
    x = sdeflow.sample_ode(model, x_T.shape, x_T=x_T, rtol=1e-6, atol=1e-6)
    assert x.dtype == torch.float64
    assert_gaussian_moments(x, data)
    assert (x - exact_flow(sde, data, x_T, 0.0)).abs().max() < 1e-3


def test_fixed_grid_ode_solver_converges_at_its_order():
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_min = 0.2
    exact = exact_flow(sde, data, x_T, t_min)
    errors = [float((sdeflow.sample_ode(model, x_T.shape, solver="rk4", step_size=h, t_min=t_min, x_T=x_T)
                     - exact).abs().max()) for h in (0.8 / 16, 0.8 / 32)]
    assert abs(math.log2(errors[0] / errors[1]) - 4) < 0.5, errors


# ---- accounting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,options", [("dopri5", {}), ("bosh3", {}), ("rk4", {"step_size": 0.1}),
                                            ("midpoint", {"step_size": 0.25})])
def test_sample_ode_reports_nfe(solver, options):
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    x_T = SDES["vp"]().prior_sample((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trace = Trace(keep_states=True)
    x = sdeflow.sample_ode(model, (5, 2), solver=solver, rtol=1e-4, atol=1e-4, x_T=x_T, callback=trace, **options)
    assert trace.nfe == model.net.calls == len(trace.times) > 0
    assert torch.equal(trace.states[0], x_T) and trace.times[0] == sde.T  # the first evaluation is at (T, x_T)
    assert torch.equal(x, sdeflow.sample_ode(model, (5, 2), solver=solver, rtol=1e-4, atol=1e-4, x_T=x_T, **options))
    if solver == "rk4":
        assert trace.nfe == 4 * 10
    if solver == "midpoint":
        assert trace.nfe == 2 * 4


def test_probability_flow_velocity_is_minus_mu_1_and_counts_calls():
    model = exact_model(SDES["vp"](), gaussian(2))
    velocity = probability_flow_velocity(model)
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert torch.equal(velocity(t, y), -model.generative_drift(y, t.expand(5), lmbd=1.0))
    velocity(t, y)
    assert velocity.nfe == 2


def test_log_prob_ode_counts_network_calls():
    model = exact_model(SDES["vp"](), gaussian(2))
    _, info = sdeflow.log_prob_ode(model, torch.zeros(3, 2, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert info["nfe"] == model.net.calls > 0


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="rk45"), "solver must be one of"),
    (dict(solver="rk4"), "needs step_size"),
    (dict(solver="rk4", step_size=-0.1), "needs step_size"),
    (dict(solver="dopri5", step_size=0.1), "sets its own steps"),
    (dict(t_min=1.0), r"t_min must lie in \[0, t_start=1.0\)"),
    (dict(t_min=-0.1), r"t_min must lie in \[0, t_start=1.0\)"),
])
def test_bad_input_to_sample_ode_says_what_is_allowed(kwargs, match):
    model = exact_model(SDES["vp"](), gaussian(2))
    with pytest.raises(ValueError, match=match):
        sdeflow.sample_ode(model, (2, 2), **kwargs)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("div", ["exact", "hutchinson"])
def test_log_prob_ode_matches_the_exact_flow(name, div):
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, "score")
    x = data.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp, info = sdeflow.log_prob_ode(model, x, divergence=div, generator=torch.Generator().manual_seed(1))
    assert info["nfe"] > 0
    # the Jacobian of a diagonal Gaussian's flow is diagonal, so even one Rademacher probe is exact
    assert (logp - expected_ode_log_prob(sde, data, x)).abs().max() < 1e-3 * data.dim
    # from t_min = 0.5 the model outputs y_{t_min}/m: its density is the marginal there, rescaled
    late = sdeflow.log_prob_ode(model, x, divergence=div, t_min=0.5, generator=torch.Generator().manual_seed(1))[0]
    assert (late - expected_ode_log_prob(sde, data, x, 0.5)).abs().max() < 1e-3 * data.dim
    assert (late - logp).abs().max() > 0.05  # far from the t_min = 0 value: the test can tell them apart


def test_the_ode_starts_where_the_elbo_does_by_default():
    """One default t_min for every likelihood: the ODE's, like the ELBO's, is default_t_min(T), so the
    README's two bounds are of one model."""
    from sdeflow.likelihood.elbo import default_t_min

    sde = sdeflow.VPSDE()
    model = exact_model(sde, gaussian(2))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    default, _ = sdeflow.log_prob_ode(model, x, generator=torch.Generator().manual_seed(1))
    explicit, _ = sdeflow.log_prob_ode(model, x, t_min=default_t_min(sde.T), generator=torch.Generator().manual_seed(1))
    from_zero, _ = sdeflow.log_prob_ode(model, x, t_min=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(default, explicit) and not torch.equal(default, from_zero)
