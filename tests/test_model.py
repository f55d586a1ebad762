"""The model: parameterizations (drift, score, noise, velocity) and the λ-family, against closed forms."""

import math

import pytest
import torch

import sdeflow
from oracle_helpers import SDES, exact_model, gaussian


PARAMETERIZATIONS = list(sdeflow.model.PARAMETERIZATIONS)

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
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generative_coefficients_are_finite_at_both_ends(name, parameterization, dtype):
    sde, data = SDES[name](), gaussian()
    model = exact_model(sde, data, parameterization).to(dtype)
    y = torch.randn(2, data.dim, dtype=dtype)
    for t in (0.0, sde.T):
        for lmbd in (0.0, 0.5, 1.0):
            assert torch.isfinite(model.generative_drift(y, t, lmbd)).all()
            assert torch.isfinite(model.generative_diffusion(y, t, lmbd)).all()
            assert model.generative_drift(y, t, lmbd).dtype == dtype

def test_lambda_family_interpolates_between_sde_and_ode():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data, "drift")
    y, t = torch.randn(5, 3, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    g, a, f = sde.g(y, t), model.drift(y, t), sde.f(y, t)
    torch.testing.assert_close(model.generative_drift(y, t, 0.0), g * a - f)
    torch.testing.assert_close(model.generative_drift(y, t, 1.0), 0.5 * g * a - f)
    torch.testing.assert_close(model.generative_diffusion(y, t, 1.0), torch.zeros_like(g))
    torch.testing.assert_close(model.generative_diffusion(y, t, 0.5), math.sqrt(0.5) * g)

def test_bad_input_raises_value_errors_naming_the_argument():
    sde, data = SDES["vp"](), gaussian()
    model = exact_model(sde, data)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="lmbd"):
        model.generative_drift(x, 0.5, lmbd=1.5)
    with pytest.raises(ValueError, match="lmbd"):
        model.generative_diffusion(x, 0.5, lmbd=-0.1)
    with pytest.raises(ValueError, match="parameterization"):
        sdeflow.PluginReverseSDE(sde, model.net, "x0")
    with pytest.raises(ValueError, match="time_sampling"):
        sdeflow.elbo(model, x, time_sampling="sobol")
    with pytest.raises(ValueError, match="time_sampling"):
        sdeflow.dsm(model, x, time_sampling="sobol")
    with pytest.raises(ValueError, match="probe"):
        sdeflow.elbo(model, x, probe="uniform")
    with pytest.raises(ValueError, match="divergence"):
        sdeflow.elbo(model, x, divergence="approx")
    with pytest.raises(ValueError, match="n_slices"):
        sdeflow.elbo(model, x, n_slices=0)
    with pytest.raises(ValueError, match="weighting"):
        sdeflow.dsm(model, x, weighting="snr")
    with pytest.raises(ValueError, match="order"):
        sdeflow.dsm(model, x, order=3)
    with pytest.raises(ValueError, match="second_order_weight"):
        sdeflow.dsm(model, x, order=2, second_order_weight=-1.0)
    with pytest.raises(ValueError, match="at most 64 dimensions"):
        sdeflow.dsm(model, torch.zeros(2, 65, dtype=torch.float64), order=2)
    with pytest.raises(ValueError, match="x"):
        sdeflow.elbo(model, torch.tensor([[0.0, float("nan"), 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="net must return"):
        sdeflow.dsm(sdeflow.PluginReverseSDE(sde, lambda_net(lambda y, t: y[:, :2])), torch.zeros(2, 3))
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
    assert sdeflow.elbo(model, x, time_sampling="importance").is_cuda
    assert sdeflow.log_prob_ode(model, x)[0].is_cuda
