r"""Analytic oracles: data laws whose score is known in closed form at every t of a linear SDE.

If x ~ Σ_k w_k N(μ_k, diag(s_k²)), then under q(y_t|x) = N(m x, v I) the marginal is
:math:`p_t = \sum_k w_k N(m\mu_k, \operatorname{diag}(m^2 s_k^2 + v))`, whose score is the
responsibility-weighted sum of the component scores. The networks here output that exact score
in any parameterization, so an estimator's or sampler's own error can be measured apart from
any learning error. Used by the tests and the benchmarks; handy for users testing a new sampler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model import velocity_coefficients
from ..sdes.linear import SDE
from ..utils import append_dims

__all__ = ["GaussianMixture", "ExactScoreNet", "ClassConditionalScoreNet", "FullCovarianceGaussian"]


class GaussianMixture:
    """Σ_k w_k N(μ_k, diag(s_k²)) in D dimensions. ``means``, ``stds``: (K, D); ``weights``: (K,)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand_as(self.means).clone()
        k = self.means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = weights / weights.sum()

    @classmethod
    def gaussian(cls, mean, std) -> "GaussianMixture":
        """A single Gaussian N(mean, diag(std²)) (mean, std: (D,))."""
        return cls(torch.as_tensor(mean, dtype=torch.float64)[None], torch.as_tensor(std, dtype=torch.float64)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
               return_labels: bool = False):
        """(n, D) draws; with ``return_labels`` also the component k of each, (n,) long: the class labels of
        a mixture whose components are the classes (:class:`ClassConditionalScoreNet`)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[comp] + self.stds[comp] * z).to(dtype)
        return (x, comp) if return_labels else x

    def _components(self, y: torch.Tensor, mean_weight, var):
        """Per-component log-density and score of p_t at y: (B, K) and (B, K, D)."""
        y = y.double()
        mean_weight = append_dims(torch.as_tensor(mean_weight, dtype=torch.float64).reshape(-1), 3)
        var = append_dims(torch.as_tensor(var, dtype=torch.float64).reshape(-1), 3)
        mu = mean_weight * self.means[None]
        comp_var = mean_weight ** 2 * self.stds[None] ** 2 + var
        diff = y[:, None, :] - mu
        log_comp = -0.5 * (diff ** 2 / comp_var + torch.log(2 * math.pi * comp_var)).sum(-1)
        return log_comp + torch.log(self.weights), -diff / comp_var

    def log_prob(self, y: torch.Tensor, mean_weight=1.0, var=0.0) -> torch.Tensor:
        """log p_t(y) for the law of m·x + √v·ε (the data itself by default). (B, D) -> (B,) float64."""
        log_comp, _ = self._components(y, mean_weight, var)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, y: torch.Tensor, mean_weight=1.0, var=0.0) -> torch.Tensor:
        """∇ log p_t(y), (B, D) float64."""
        log_comp, comp_score = self._components(y, mean_weight, var)
        resp = torch.softmax(log_comp, dim=1)
        return (resp[..., None] * comp_score).sum(1)


class ExactScoreNet(nn.Module):
    """``net(y, t)`` that returns the exact score of ``mixture`` under ``sde`` in the given
    parameterization ("score": s, "drift": g·s, "noise": ε = −std·s, "velocity": (ε − σ·c·y)/α of
    :func:`sdeflow.model.velocity_coefficients`), for y of shape (B, D).
    Computes in float64 and returns y's dtype.
    """

    def __init__(self, sde: SDE, mixture: GaussianMixture, parameterization: str = "score"):
        super().__init__()
        self.sde, self.mixture, self.parameterization = sde, mixture, parameterization
        self.calls = 0

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t64 = t.double()
        mean_weight, var = self.sde.mean_weight(t64), self.sde.var(t64)
        # The score is differentiable in y, so the divergence can be taken through it.
        s = self.mixture.score(y, mean_weight, var)
        if self.parameterization == "drift":
            s = s * self.sde.g2(t64).sqrt()[:, None]
        elif self.parameterization in ("noise", "velocity"):
            s = -s * var.sqrt()[:, None]
            if self.parameterization == "velocity":
                c, alpha, sigma = velocity_coefficients(self.sde, t64)
                s = (s - (sigma * c)[:, None] * y.double()) / alpha[:, None]
        return s.to(y.dtype)


class ClassConditionalScoreNet(nn.Module):
    """``net(y, t, labels)`` of a Gaussian mixture whose components are the classes: the exact score of
    component k for label k, and of the whole mixture for the null label (``num_classes``, or None), in
    the given parameterization (as :class:`ExactScoreNet`). The oracle of classifier-free guidance."""

    def __init__(self, sde: SDE, mixture: GaussianMixture, parameterization: str = "score"):
        super().__init__()
        self.num_classes = mixture.means.shape[0]
        self.nets = [ExactScoreNet(sde, GaussianMixture(mixture.means[k:k + 1], mixture.stds[k:k + 1]),
                                   parameterization) for k in range(self.num_classes)]
        self.nets.append(ExactScoreNet(sde, mixture, parameterization))  # the null class: the mixture
        self.calls = 0

    def forward(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        from .classes import check_labels

        self.calls += 1
        labels = check_labels(labels, self.num_classes, y.shape[0], y.device)
        out = torch.zeros_like(y)
        for k, net in enumerate(self.nets):
            chosen = labels == k
            if bool(chosen.any()):
                out = out.index_put((chosen,), net(y[chosen], t[chosen]))
        return out


class FullCovarianceGaussian:
    r"""A correlated Gaussian N(μ, Σ) in D dimensions (full covariance) with every quantity a
    conditional-generation test needs in closed form. ``mean``: (D,); ``cov``: (D, D), symmetric
    positive definite.

    Under a linear SDE with q(y_t|x) = N(m x, v I) the marginal is
    :math:`p_t = N(m\mu,\ m^2\Sigma + vI)`, so the score is
    :math:`\nabla\log p_t(y) = -(m^2\Sigma + vI)^{-1}(y - m\mu)`. The conditional of the
    coordinates ``~observed`` given the ``observed`` ones, and the posterior of x given a
    linear-Gaussian observation y = A x + σ_n ε, are Gaussian too (:meth:`conditional`,
    :meth:`posterior`). ``score`` has the signature of :meth:`GaussianMixture.score`, so
    ``ExactScoreNet(sde, FullCovarianceGaussian(...))`` is the exact network.
    """

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        d = self.mean.shape[0]
        if self.cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) to match mean; got {tuple(self.cov.shape)}")
        if not torch.allclose(self.cov, self.cov.T, atol=1e-10):
            raise ValueError("cov must be symmetric")
        # Cholesky fails (and says so) when cov is not positive definite.
        try:
            self._chol = torch.linalg.cholesky(self.cov)
        except RuntimeError as err:
            raise ValueError(f"cov must be positive definite: {err}") from None

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """x = μ + L z with Σ = L Lᵀ, z ~ N(0, I): (n, D)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + z @ self._chol.T).to(dtype)

    def _marginal(self, mean_weight, var):
        """Per-example mean (B, D) and covariance (B, D, D) of p_t (B = number of times given)."""
        mean_weight = torch.as_tensor(mean_weight, dtype=torch.float64).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64).reshape(-1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = mean_weight[:, None, None] ** 2 * self.cov + var[:, None, None] * eye
        return mean_weight[:, None] * self.mean, cov

    def log_prob(self, y: torch.Tensor, mean_weight=1.0, var=0.0) -> torch.Tensor:
        """log N(y; m μ, m²Σ + vI): (B, D) -> (B,) float64."""
        mu, cov = self._marginal(mean_weight, var)
        dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
        return dist.log_prob(y.double())

    def score(self, y: torch.Tensor, mean_weight=1.0, var=0.0) -> torch.Tensor:
        """−(m²Σ + vI)⁻¹(y − m μ): (B, D) float64 (differentiable in y)."""
        mean_weight = torch.as_tensor(mean_weight, dtype=torch.float64).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64).reshape(-1)
        # A sampler asks for one time per batch: then invert one matrix, not one per example.
        if bool((mean_weight == mean_weight[0]).all() and (var == var[0]).all()):
            mu, cov = self._marginal(mean_weight[:1], var[:1])
            return -(y.double() - mu) @ torch.linalg.inv(cov[0])
        mu, cov = self._marginal(mean_weight, var)
        diff = (y.double() - mu).unsqueeze(-1)
        return -torch.linalg.solve(cov.expand(y.shape[0], -1, -1), diff).squeeze(-1)

    def conditional(self, observed, x_observed: torch.Tensor):
        r"""Law of the unobserved coordinates given the observed ones:
        :math:`N(\mu_u + \Sigma_{uo}\Sigma_{oo}^{-1}(x_o - \mu_o),\ \Sigma_{uu} - \Sigma_{uo}\Sigma_{oo}^{-1}\Sigma_{ou})`.

        ``observed``: bool (D,); ``x_observed``: the observed values, (n_observed,).
        Returns the mean (n_missing,) and covariance (n_missing, n_missing), float64.
        """
        observed = torch.as_tensor(observed, dtype=torch.bool).reshape(-1)
        missing = ~observed
        x_o = torch.as_tensor(x_observed, dtype=torch.float64).reshape(-1)
        s_oo = self.cov[observed][:, observed]
        s_uo = self.cov[missing][:, observed]
        gain = torch.linalg.solve(s_oo, s_uo.T).T
        mean = self.mean[missing] + gain @ (x_o - self.mean[observed])
        cov = self.cov[missing][:, missing] - gain @ s_uo.T
        return mean, 0.5 * (cov + cov.T)

    def posterior(self, A: torch.Tensor, y: torch.Tensor, noise_std: float):
        r"""Law of x given y = A x + σ_n ε, ε ~ N(0, I): with K = AΣAᵀ + σ_n² I,
        :math:`N(\mu + \Sigma A^T K^{-1}(y - A\mu),\ \Sigma - \Sigma A^T K^{-1} A \Sigma)`.

        ``A``: (M, D); ``y``: (M,). Returns mean (D,) and covariance (D, D), float64.
        """
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        K = A @ self.cov @ A.T + noise_std ** 2 * torch.eye(A.shape[0], dtype=torch.float64)
        gain = torch.linalg.solve(K, A @ self.cov).T  # Σ Aᵀ K⁻¹, (D, M)
        mean = self.mean + gain @ (y - A @ self.mean)
        cov = self.cov - gain @ A @ self.cov
        return mean, 0.5 * (cov + cov.T)
