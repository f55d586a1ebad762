import math

import pytest
import torch

import sdeflow
from oracle_helpers import SDES

ALL = list(SDES)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_moments_solve_their_odes(name):
    """m' = f·m and v' = 2 f v + g², checked by central differences."""
    sde = SDES[name]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    dm = (sde.mean_weight(t + h) - sde.mean_weight(t - h)) / (2 * h)
    dv = (sde.var(t + h) - sde.var(t - h)) / (2 * h)
    torch.testing.assert_close(dm, sde.f_coef(t) * sde.mean_weight(t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dv, 2 * sde.f_coef(t) * sde.var(t) + sde.g2(t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sde.var(_t([0.0])), _t([0.0]))
    torch.testing.assert_close(sde.mean_weight(_t([0.0])), _t([1.0]))


@pytest.mark.parametrize("name", ALL)
def test_log_snr_and_its_inverse(name):
    sde = SDES[name]()
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(sde.log_snr(t), torch.log(sde.mean_weight(t) ** 2 / sde.var(t)))
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-8, atol=1e-10)
    # g²/v = −dλ/dt, the identity the importance density rests on
    h = 1e-7
    dlam = (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(-dlam, sde.g2(t) / sde.var(t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_sample_matches_marginal(name):
    sde = SDES[name]()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 2), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 0.3, dtype=torch.float64)
    y, noise, std, g = sde.sample(x0, t, return_noise=True, generator=gen)
    assert std.shape == (20000, 1) and g.shape == (20000, 1)
    torch.testing.assert_close(y, sde.mean_weight(t)[:, None] * x0 + std * noise)
    m, s = float(sde.mean_weight(t[0])) * 0.7, float(sde.std(t[0]))
    assert abs(y.mean().item() - m) < 4 * s / math.sqrt(40000)
    assert abs(y.std().item() / s - 1) < 0.02


@pytest.mark.parametrize("name", ALL)
def test_prior_log_prob_and_its_expectation(name):
    sde = SDES[name]()
    gen = torch.Generator().manual_seed(1)
    y = sde.prior_sample((5, 3, 2, 2), generator=gen, dtype=torch.float64)
    dist = torch.distributions.Normal(0.0, math.sqrt(sde.prior_var))
    torch.testing.assert_close(sde.prior_log_prob(y), dist.log_prob(y).flatten(1).sum(1))
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    T = torch.full((200000,), sde.T, dtype=torch.float64)
    y_T = sde.sample(x.repeat(50000, 1), T, generator=gen)
    mc = sde.prior_log_prob(y_T).reshape(50000, 4)
    err = (mc.mean(0) - sde.expected_prior_log_prob(x)).abs()
    assert (err < 5 * mc.std(0) / math.sqrt(50000) + 1e-9).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoints_are_finite(name, dtype):
    sde = SDES[name]()
    t = torch.tensor([0.0, sde.T], dtype=dtype)
    y = torch.ones(2, 3, dtype=dtype)
    for value in (sde.f(y, t), sde.g(y, t), sde.mean_weight(t), sde.var(t), sde.std(t), sde.g2(t)):
        assert torch.isfinite(value).all()
        assert value.dtype == dtype
    assert sde.log_snr(t)[0] == math.inf


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="beta_min"):
        sdeflow.VPSDE(beta_min=-1)
    with pytest.raises(ValueError, match="beta_max"):
        sdeflow.SubVPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_max"):
        sdeflow.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="T"):
        sdeflow.VPSDE(T=0)


def test_T_scales_the_schedule():
    """β runs from β_min at 0 to β_max at T, whatever T."""
    a, b = sdeflow.VPSDE(T=1.0), sdeflow.VPSDE(T=2.0)
    t = _t([0.0, 0.3, 1.0])
    torch.testing.assert_close(b.beta(2 * t), a.beta(t))
    torch.testing.assert_close(b.beta_integral(2 * t), 2 * a.beta_integral(t))
    torch.testing.assert_close(b.beta(_t([2.0])), _t([20.0]))
