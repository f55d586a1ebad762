"""The sliced Wasserstein distance between point sets: a sample-quality metric that needs no learned features."""

from __future__ import annotations

import torch

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 200,
                       generator: torch.Generator | None = None) -> float:
    r"""Sliced Wasserstein-1 distance between two equal-size point sets (N, D):

    .. math::  SW_1(x, y) = E_{\theta \sim U(S^{D-1})}\, \frac1N \sum_i |(\theta^\top x)_{(i)} - (\theta^\top y)_{(i)}|,

    the 1-D Wasserstein-1 distance between sorted projections, averaged over ``n_projections``
    random directions.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape (N, D); got {tuple(x.shape)} and {tuple(y.shape)}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1; got {n_projections}")
    x, y = x.double(), y.double()
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return float((px - py).abs().mean())
