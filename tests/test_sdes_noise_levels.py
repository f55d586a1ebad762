"""The VP SDEs of other libraries' noise schedules: closed forms, the discrete table's exactness at the
training steps, a monotone log-SNR with its inverse, and the registry's round trip."""

import math

import pytest
import torch

import sdeflow
from sdeflow.sdes.noise_levels import CosineVPSDE, DiscreteVPSDE, discrete_alphas_cumprod
from sdeflow.sdes.linear import make_sde, sde_config

SCHEDULES = {
    "cosine": lambda: CosineVPSDE(),
    "cosine-short": lambda: CosineVPSDE(s=0.02, end=0.9, T=2.0),
    "linear": lambda: DiscreteVPSDE(),
    "scaled_linear": lambda: DiscreteVPSDE("scaled_linear", 0.00085, 0.012, 1000),
    "squaredcos_cap_v2": lambda: DiscreteVPSDE("squaredcos_cap_v2", num_train_timesteps=50, T=3.0),
    "sigmoid": lambda: DiscreteVPSDE("sigmoid", 1e-4, 0.02, 200),
    "given": lambda: DiscreteVPSDE("given", alphas_cumprod=(0.9, 0.5, 0.2, 0.01)),
}


def _grid(sde, n=2001):
    return torch.linspace(0.0, sde.T, n, dtype=torch.float64)


def test_cosine_is_improved_ddpms_closed_form():
    sde = CosineVPSDE(s=0.008, end=0.999, T=2.0)
    t = _grid(sde)[:-1]
    theta = 0.5 * math.pi * (0.999 * t / 2.0 + 0.008) / 1.008
    alpha_bar = torch.cos(theta) ** 2 / math.cos(0.5 * math.pi * 0.008 / 1.008) ** 2
    assert torch.allclose(sde.mean_weight(t) ** 2, alpha_bar, rtol=1e-12, atol=0)
    assert torch.allclose(sde.var(t), 1 - alpha_bar, rtol=1e-9, atol=1e-15)
    # The closed form's own table, at diffusers' steps u = n/N (before the 0.999 cap bites), is squaredcos_cap_v2's.
    table = discrete_alphas_cumprod("squaredcos_cap_v2", num_train_timesteps=1000).double()
    u = torch.arange(1, 991, dtype=torch.float64) / 1000
    closed = CosineVPSDE(end=0.999).mean_weight(u * 1.0 / 0.999) ** 2
    assert torch.allclose(closed, table[:990], rtol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_rates_agree_with_the_marginals(name):
    """v' = 2 f v + g², m' = f m and −λ' = g²/v, by central differences inside each interval."""
    sde = SCHEDULES[name]()
    t = _grid(sde, 997)[1:-1] + 1e-4 * sde.T  # off the knots of a discrete table
    h = 1e-7 * sde.T
    dv = (sde.var(t + h) - sde.var(t - h)) / (2 * h)
    dm = (sde.mean_weight(t + h) - sde.mean_weight(t - h)) / (2 * h)
    dlam = (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    assert torch.allclose(dv, 2 * sde.f_coef(t) * sde.var(t) + sde.g2(t), rtol=1e-5, atol=1e-6)
    assert torch.allclose(dm, sde.f_coef(t) * sde.mean_weight(t), rtol=1e-5, atol=1e-6)
    assert torch.allclose(-dlam, sde.g2(t) / sde.var(t), rtol=1e-5)
    assert torch.allclose(sde.mean_weight(t) ** 2 + sde.var(t), torch.ones_like(t), atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_discrete_table_is_exact_at_the_steps(name):
    sde = SCHEDULES[name]()
    table = discrete_alphas_cumprod(sde.beta_schedule, sde.beta_start, sde.beta_end, sde.num_train_timesteps).double()
    steps = torch.arange(1, sde.num_train_timesteps + 1)
    t = sde.step_time(steps)
    assert torch.allclose(sde.mean_weight(t) ** 2, table, rtol=1e-13, atol=0)
    assert torch.allclose(sde.log_snr(t), torch.log(table / (1 - table)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(sde.timestep(t), (steps - 1).double(), atol=1e-9)
    assert sde.first_step_time() == pytest.approx(float(t[0]))
    assert float(sde.var(torch.tensor(0.0, dtype=torch.float64))) == 0.0


def test_given_table_is_exact_and_rebuilds_diffusers_tables():
    from_name = DiscreteVPSDE("linear", 1e-4, 0.02, 1000)
    given = DiscreteVPSDE("given", alphas_cumprod=discrete_alphas_cumprod("linear").tolist())
    t = _grid(from_name)
    assert torch.equal(from_name.log_snr(t), given.log_snr(t))
    sde = SCHEDULES["given"]()
    assert torch.allclose(sde.mean_weight(sde.step_time(torch.arange(1, 5))) ** 2,
                          torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float64), rtol=1e-14)


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_snr_decreases_strictly_and_inverts(name):
    sde = SCHEDULES[name]()
    t = _grid(sde, 20001)
    lam = sde.log_snr(t)
    assert lam[0] == math.inf and bool((lam[1:] < lam[:-1]).all())
    back = sde.t_from_log_snr(lam)
    assert torch.allclose(back, t, atol=1e-10 * sde.T, rtol=0)
    assert float(sde.t_from_log_snr(torch.tensor(-math.inf, dtype=torch.float64))) == pytest.approx(sde.T)
    assert sde.prior_var == 1.0


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "given"])
def test_registry_round_trip(name):
    sde = SCHEDULES[name]()
    config = sde_config(sde)
    assert config["name"] in ("cosine", "discrete") and sdeflow.SDES[config["name"]] is type(sde)
    rebuilt = make_sde(**config)
    assert rebuilt == sde and hash(rebuilt) == hash(sde)
    assert torch.equal(rebuilt.log_snr(_grid(sde)), sde.log_snr(_grid(sde)))


def test_given_table_is_not_storable_in_a_config():
    sde = SCHEDULES["given"]()
    assert make_sde("discrete", **sde.parameters()) == sde
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sde_config(sde)


@pytest.mark.parametrize("kwargs, word", [
    ({"beta_schedule": "quadratic"}, "beta_schedule"),
    ({"beta_schedule": "given"}, "alphas_cumprod"),
    ({"alphas_cumprod": (0.9, 0.5)}, "alphas_cumprod"),
    ({"beta_schedule": "given", "alphas_cumprod": (0.9, 0.95)}, "alphas_cumprod"),
    ({"beta_schedule": "given", "alphas_cumprod": (1.0, 0.5)}, "alphas_cumprod"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"T": -1.0}, "T"),
])
def test_discrete_refuses_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DiscreteVPSDE(**kwargs)


@pytest.mark.parametrize("kwargs, word", [({"end": 1.0}, "end"), ({"end": 0.0}, "end"), ({"s": 0.0}, "s")])
def test_cosine_refuses_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word):
        CosineVPSDE(**kwargs)
