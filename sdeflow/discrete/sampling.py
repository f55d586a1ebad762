r"""Ancestral sampling of the discrete-time model (DDPM's Algorithm 2, for any linear SDE).

From :math:`y_N \sim p_T`, for n = N, …, 1:

.. math::  y_{n-1} = \mu_\theta(y_n, n) + \sigma_n z,\qquad
           \mu_\theta = \frac{1}{a_n}\Big(y_n - \frac{\beta_n}{\sqrt{v_n}}\,\hat\varepsilon(y_n, t_n)\Big),
           \quad z \sim N(0, I),

with no noise at n = 1, whose mean x̂_0 is the sample (as DDPM's code does); the chain, a_n, β_n and
the variance choices as in :mod:`sdeflow.discrete.chain` and :mod:`sdeflow.discrete.variances`. One
network evaluation per step (a learned variance with a network of its own adds one evaluation of it
per step; the variance head of the model's network adds none).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..utils import model_device_dtype
from .chain import forward_chain
from .variances import check_variance, noise_and_variance

__all__ = ["ancestral_sample"]


@torch.no_grad()
def ancestral_sample(model, variance, n_steps: int, shape, generator: torch.Generator | None = None,
                     callback: Callable[[dict], None] | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """Samples of ``shape`` (B, ...) from the ``n_steps``-step model (DDPM's grid t_n = n·T/N) with
    reverse variances ``variance`` ("posterior", "step", an AnalyticVariance or a LearnedVariance).
    ``generator`` draws the prior and every noise; ``callback`` gets {"i", "t", "x"} after every step
    (i counts the steps taken, t is t_{n−1}). ``device``/``dtype`` default to the model's."""
    check_variance(variance)
    chain = forward_chain(model.sde, n_steps=n_steps)
    device, dtype = model_device_dtype(model, device, dtype)
    y = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    step_mean_weight, step_var, std = chain.step_mean_weight, chain.step_var, chain.var.sqrt()
    for i, step in enumerate(range(chain.n_steps, 0, -1)):
        t = torch.full((y.shape[0],), float(chain.times[step]), device=device, dtype=dtype)
        n = torch.full((y.shape[0],), step, dtype=torch.long, device=device)
        eps_hat, var = noise_and_variance(model, variance, chain, n, y, t)
        mean = (y - float(step_var[step] / std[step]) * eps_hat) / float(step_mean_weight[step])
        if step > 1:
            mean = mean + var.to(dtype).sqrt() * torch.randn(y.shape, generator=generator, device=device, dtype=dtype)
        y = mean
        if callback is not None:
            callback({"i": i, "t": chain.times[step - 1], "x": y})
    return y
