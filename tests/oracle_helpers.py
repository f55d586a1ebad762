"""Closed forms the core tests compare against: a diagonal Gaussian under a linear SDE."""

from __future__ import annotations

import math

import pytest
import torch

import sdeflow
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture

SDES = {
    "vp": lambda: sdeflow.VPSDE(beta_min=0.1, beta_max=20.0),
    "ve": lambda: sdeflow.VESDE(sigma_min=0.01, sigma_max=50.0),
    "subvp": lambda: sdeflow.SubVPSDE(beta_min=0.1, beta_max=20.0),
}


def gaussian(dim: int = 3) -> GaussianMixture:
    return GaussianMixture.gaussian(torch.linspace(-0.5, 0.8, dim), torch.linspace(0.3, 1.0, dim))


def exact_model(sde, data: GaussianMixture, parameterization: str = "score") -> sdeflow.PluginReverseSDE:
    return sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, data, parameterization), parameterization).double()


def _gauss_cross_entropy(mean_a, var_a, mean_b, var_b):
    """E_{y ~ N(a, var_a)}[log N(y; b, var_b)], summed over the last dim."""
    return (-0.5 * torch.log(2 * math.pi * var_b) - ((mean_a - mean_b) ** 2 + var_a) / (2 * var_b)).sum(-1)


def marginal_T(sde, data: GaussianMixture):
    T = torch.tensor(sde.T, dtype=torch.float64)
    m, v = sde.mean_weight(T), sde.var(T)
    return m, v, m * data.means[0], m ** 2 * data.stds[0] ** 2 + v


def expected_elbo(sde, data: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """With the exact score, ELBO(x) = log p(x) + E_{y_T|x}[log p_T(y_T) − log q_T(y_T)]:
    the only gap is the prior's mismatch with the true marginal q_T (Huang et al. 2021)."""
    x = x.double()
    return data.log_prob(x) + _prior_mismatch(sde, data, x)


def _prior_mismatch(sde, data, x):
    m, v, mean_T, var_T = marginal_T(sde, data)
    prior_var = torch.tensor(sde.prior_var, dtype=torch.float64)
    return (_gauss_cross_entropy(m * x, v, torch.zeros(()), prior_var)
            - _gauss_cross_entropy(m * x, v, mean_T, var_T))


class OffsetNoiseNet(torch.nn.Module):
    """An ε network with an error that does not vanish as t → 0, like a trained one's: the exact
    ε̂ = −std·s of a Gaussian plus a constant ``offset`` δ (D,). Its ELBO integrand grows like
    −½‖δ‖² g²/v ≈ −‖δ‖²/(2t), so the bound run to t = 0 is −∞ and estimates of it are heavy-tailed."""

    def __init__(self, sde, data, offset):
        super().__init__()
        self.exact = ExactScoreNet(sde, data, "noise")
        self.offset = torch.as_tensor(offset, dtype=torch.float64)

    def forward(self, y, t):
        return self.exact(y, t) + self.offset.to(y.dtype)


def expected_truncated_elbo(sde, data: GaussianMixture, x: torch.Tensor, t_min: float, offset=None) -> torch.Tensor:
    r"""The ELBO run from T down to t_min with the Gaussian decoder, for the exact score of ``data``:
    :math:`E_{q(y|x)}[\log q_{t_{min}}(y)] + D\log m(t_{min})` + the prior mismatch
    :math:`E_{y_T|x}[\log p_T - \log q_T]` (t_min = 0: :func:`expected_elbo`). With the ε network of
    :class:`OffsetNoiseNet` (a = a* − gδ/std), the integrand's mean moves by
    :math:`(g^2/std)\,\delta\cdot E_{y_t|x}[s(y_t)] - \tfrac12 (g^2/v)\|\delta\|^2`, integrated by
    Gauss–Legendre quadrature in log t. Closed forms for a single Gaussian; for a mixture the
    expectations over y are Monte-Carlo averages of 200,000 common draws (error well under 10⁻²)."""
    x = x.double()
    t = torch.tensor(float(t_min), dtype=torch.float64)
    m, v = sde.mean_weight(t), sde.var(t)
    single = data.means.shape[0] == 1
    if single:
        mu, var = data.means[0], data.stds[0] ** 2
        value = (_gauss_cross_entropy(m * x, v, m * mu, m ** 2 * var + v) + data.dim * torch.log(m)
                 + _prior_mismatch(sde, data, x))
    else:
        eps = torch.randn(200_000, data.dim, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        T = torch.tensor(sde.T, dtype=torch.float64)
        m_T, v_T = sde.mean_weight(T), sde.var(T)
        value = []
        for xi in x:
            y, y_T = m * xi + v.sqrt() * eps, m_T * xi + v_T.sqrt() * eps
            value.append(data.log_prob(y, m, v).mean() + data.dim * torch.log(m)
                         + (sde.prior_log_prob(y_T) - data.log_prob(y_T, m_T, v_T)).mean())
        value = torch.stack(value)
    if offset is None:
        return value
    offset = torch.as_tensor(offset, dtype=torch.float64)
    if t_min <= 0:
        raise ValueError("with an offset the bound run to t = 0 is -inf")
    nodes, weights = (torch.from_numpy(a) for a in __import__("numpy").polynomial.legendre.leggauss(96))
    lo, hi = math.log(t_min), math.log(sde.T)
    log_t = lo + (nodes + 1) * (hi - lo) / 2
    eps = torch.randn(20_000, data.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    shift = torch.zeros(x.shape[0], dtype=torch.float64)
    for lt, w in zip(log_t, weights * (hi - lo) / 2):
        s = torch.exp(lt)
        m_s, v_s, g2 = sde.mean_weight(s), sde.var(s), sde.g2(s)
        for i, xi in enumerate(x):
            if single:
                mean_score = -(m_s * xi - m_s * data.means[0]) / (m_s ** 2 * data.stds[0] ** 2 + v_s)
            else:
                mean_score = data.score(m_s * xi + v_s.sqrt() * eps, m_s, v_s).mean(0)
            rate = g2 / v_s.sqrt() * (offset * mean_score).sum() - 0.5 * g2 / v_s * (offset ** 2).sum()
            shift[i] += w * rate * s  # d t = t d log t
    return value + shift


def expected_ode_log_prob(sde, data: GaussianMixture, x: torch.Tensor, t_min: float = 0.0) -> torch.Tensor:
    """The probability-flow ODE maps a diagonal Gaussian's marginals linearly, from y at t_min to
    y_T = mean_T + std_T/std_{t_min}·(y − mean_{t_min}), so the model that runs it down to t_min and
    outputs y/m has log p(x) = log q_{t_min}(m x) + D log m + log p_T(y_T) − log q_T(y_T)."""
    x = x.double()
    _, _, mean_T, var_T = marginal_T(sde, data)
    t = torch.tensor(float(t_min), dtype=torch.float64)
    m = sde.mean_weight(t)
    y = m * x
    var = m ** 2 * data.stds[0] ** 2 + sde.var(t)
    y_T = mean_T + (var_T / var).sqrt() * (y - m * data.means[0])
    exact_T = (-0.5 * torch.log(2 * math.pi * var_T) - (y_T - mean_T) ** 2 / (2 * var_T)).sum(-1)
    log_q = data.log_prob(y, m, sde.var(t))
    return log_q + data.dim * torch.log(m) + sde.prior_log_prob(y_T) - exact_T


# |error| < Z standard errors: a failure rate of ~1e-5 per checked number.
Z = 4.5


def true_marginal_T(sde, data, n, generator):
    """x_T drawn from the true marginal q_T (not the prior), so any λ should return the data law."""
    x0 = data.sample(n, generator=generator, dtype=torch.float64)
    return sde.sample(x0, torch.full((n,), sde.T, dtype=torch.float64), generator=generator)


def assert_gaussian_moments(x, data):
    n = x.shape[0]
    mean, std = data.means[0], data.stds[0]
    mean_z = (x.mean(0) - mean) / (std / math.sqrt(n))
    assert (mean_z.abs() < Z).all(), f"sample mean off by {mean_z} standard errors"
    std_ratio = x.std(0) / std
    assert ((std_ratio - 1).abs() < Z / math.sqrt(2 * n)).all(), f"sample std / true std = {std_ratio}"
    corr = torch.corrcoef(x.T)
    off_diagonal = corr - torch.diag(torch.diag(corr))
    assert off_diagonal.abs().max() < Z / math.sqrt(n), f"spurious correlation {corr}"


def exact_flow(sde, data, x_T, t_min):
    """The probability-flow ODE maps a diagonal Gaussian's marginals linearly:
    x_t = m_t μ + √((m_t² s² + v_t)/(m_T² s² + v_T)) (x_T − m_T μ)."""
    T, t = torch.tensor(sde.T, dtype=torch.float64), torch.tensor(float(t_min), dtype=torch.float64)
    m_T, v_T, m_t, v_t = sde.mean_weight(T), sde.var(T), sde.mean_weight(t), sde.var(t)
    mu, s = data.means[0], data.stds[0]
    return m_t * mu + ((m_t ** 2 * s ** 2 + v_t) / (m_T ** 2 * s ** 2 + v_T)).sqrt() * (x_T - m_T * mu)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches here are small: intra-op threads only contend with each other (10× slower on a
    busy 2-core machine). Import it into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConstantVPSDE(sdeflow.SDE):
    r"""VP with constant β: dY = −½β Y dt + √β dB, so m = e^{−βt/2}, v = 1 − e^{−βt},
    λ = −log(e^{βt} − 1), and the prior N(0, I)."""

    def __init__(self, beta: float = 8.0, T: float = 1.0):
        super().__init__(T)
        self.beta = float(beta)

    def f_coef(self, t):
        return torch.full_like(self._t(t), -0.5 * self.beta)

    def g2(self, t):
        return torch.full_like(self._t(t), self.beta)

    def mean_weight(self, t):
        return torch.exp(-0.5 * self.beta * self._t(t))

    def var(self, t):
        return -torch.expm1(-self.beta * self._t(t))

    def log_snr(self, t):
        return -torch.log(torch.expm1(self.beta * self._t(t)))

    def t_from_log_snr(self, log_snr):
        return torch.nn.functional.softplus(-log_snr) / self.beta

    @property
    def prior_var(self) -> float:
        return 1.0
