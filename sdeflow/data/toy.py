r"""Two-dimensional toy data sets, each a seeded function ``name(n, generator=None) -> (n, 2)`` float32.

All sit roughly in [-3, 3]², the scale at which the VP SDE's prior N(0, I) is a sensible end point.

- :func:`swissroll`: the spiral :math:`r(\theta) = \theta/5`, θ = 1.5π(1 + 2u), plus Gaussian noise.
- :func:`moons`: two interleaving half circles plus Gaussian noise.
- :func:`eight_gaussians`: eight Gaussians on a circle (a Gaussian mixture, so its density is exact).
- :func:`checkerboard`: uniform on the eight black unit squares of a 4×4 board on [-2, 2]²;
  its exact log-density is −log 8 on the squares and −∞ off them (discontinuous at the edges).
- :func:`gaussian_mixture`: an anisotropic four-component mixture, exact via
  :class:`sdeflow.nets.oracles.GaussianMixture`.

The two mixtures are labelled: ``return_labels=True`` also returns each point's component, the class
whose exact conditional score :class:`sdeflow.nets.oracles.ClassConditionalScoreNet` gives.

Each is registered in :data:`sdeflow.data.DATASETS` (the one data-set registry, with its exact
log-density where known); :func:`sample_toy` and :func:`toy_log_prob` look a toy set up there by name.
"""

from __future__ import annotations

import math

import torch

from ..nets.oracles import GaussianMixture
from ..utils import check_nonneg_float, check_positive_int

__all__ = [
    "swissroll", "moons", "eight_gaussians", "checkerboard", "gaussian_mixture",
    "checkerboard_log_prob", "eight_gaussians_log_prob", "gaussian_mixture_log_prob",
    "EIGHT_GAUSSIANS", "GAUSSIAN_MIXTURE",
]


def _check_noise(noise: float) -> float:
    return check_nonneg_float("noise", noise)


def swissroll(n: int, noise: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The swiss roll of scikit-learn's ``make_swiss_roll`` seen from above, scaled by 1/5:

    .. math::  x = \tfrac15\big(\theta\cos\theta + \sigma z_1,\ \theta\sin\theta + \sigma z_2\big),
               \quad \theta = 1.5\pi(1 + 2u),\ u \sim U(0, 1),\ z \sim N(0, I),

    with σ = ``noise`` (0.5: a band 0.1 wide around a spiral of radius 0.94 to 2.83). (n, 2) float32.
    """
    n, noise = check_positive_int("n", n), _check_noise(noise)
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    spiral = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1)
    points = spiral + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (points / 5).float()


def moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""scikit-learn's two moons, centred and scaled by 1.5: half the points on
    :math:`(\cos\theta, \sin\theta)`, half on :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)`,
    θ ~ U(0, π), plus N(0, ``noise``²·I) before centring at (½, ¼) and scaling. (n, 2) float32.
    """
    n, noise = check_positive_int("n", n), _check_noise(noise)
    theta = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    upper = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    inner = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    points = torch.where(upper[:, None], outer, inner)
    points = points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (1.5 * (points - torch.tensor([0.5, 0.25], dtype=torch.float64))).float()


def _eight_gaussians_mixture(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, torch.full_like(means, std))


#: Eight N(μ_k, 0.2²·I) with μ_k = 2·(cos kπ/4, sin kπ/4), equal weights.
EIGHT_GAUSSIANS = _eight_gaussians_mixture()

#: Four anisotropic components of unequal weight, overlapping enough that no mode is isolated.
GAUSSIAN_MIXTURE = GaussianMixture(
    means=[[-1.2, -0.8], [1.3, -0.6], [0.0, 1.3], [1.5, 1.6]],
    stds=[[0.5, 0.3], [0.3, 0.5], [0.4, 0.4], [0.25, 0.25]],
    weights=[0.3, 0.3, 0.25, 0.15],
)


def eight_gaussians(n: int, generator: torch.Generator | None = None, return_labels: bool = False):
    r"""Draw from :data:`EIGHT_GAUSSIANS`, :math:`\tfrac18\sum_k N(2(\cos\tfrac{k\pi}4, \sin\tfrac{k\pi}4), 0.2^2 I)`.
    (n, 2) float32; with ``return_labels`` also each point's component k, (n,) long."""
    return EIGHT_GAUSSIANS.sample(check_positive_int("n", n), generator=generator, return_labels=return_labels)


def eight_gaussians_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of :func:`eight_gaussians`, (n, 2) -> (n,) float64."""
    return EIGHT_GAUSSIANS.log_prob(_check_points(x))


def gaussian_mixture(n: int, generator: torch.Generator | None = None, return_labels: bool = False):
    r"""Draw from :data:`GAUSSIAN_MIXTURE`, :math:`\sum_k w_k N(\mu_k, \mathrm{diag}(s_k^2))`. (n, 2) float32;
    with ``return_labels`` also each point's component k, (n,) long."""
    return GAUSSIAN_MIXTURE.sample(check_positive_int("n", n), generator=generator, return_labels=return_labels)


def gaussian_mixture_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of :func:`gaussian_mixture`, (n, 2) -> (n,) float64."""
    return GAUSSIAN_MIXTURE.log_prob(_check_points(x))


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Uniform on the eight unit squares [i, i+1]×[j, j+1] ⊂ [-2, 2]² with i + j even: pick a
    column i ∈ {-2..1} and one of its two black rows uniformly, then a uniform point in the square.
    Density 1/8 on the squares. (n, 2) float32.
    """
    n = check_positive_int("n", n)
    column = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + column % 2
    corner = torch.stack([column, row], dim=1).double() - 2
    return (corner + torch.rand(n, 2, generator=generator, dtype=torch.float64)).float()


def checkerboard_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of :func:`checkerboard`: −log 8 on the black squares, −∞ elsewhere.
    (n, 2) -> (n,) float64. Points on an edge count as inside."""
    x = _check_points(x).double()
    inside_board = ((x >= -2) & (x <= 2)).all(dim=1)
    cell = torch.floor(x.clamp(-2, 2 - 1e-12)).long()
    black = (cell[:, 0] + cell[:, 1]) % 2 == 0
    log_density = torch.full((x.shape[0],), -math.log(8.0), dtype=torch.float64)
    return torch.where(inside_board & black, log_density, torch.full_like(log_density, -math.inf))


def _check_points(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[1] != 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, 2); got {shape}")
    return x

