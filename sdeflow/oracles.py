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

from .sdes import SDE
from .utils import append_dims

__all__ = ["GaussianMixture", "ExactScoreNet"]


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

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp] * z).to(dtype)

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
    parameterization ("score": s, "drift": g·s, "noise": −std·s), for y of shape (B, D).
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
        elif self.parameterization == "noise":
            s = -s * var.sqrt()[:, None]
        return s.to(y.dtype)
