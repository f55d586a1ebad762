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

from ..discrete.variances import check_variance
from ..utils import check_positive_int
from .loop import sample
from .settings import SamplerSettings

__all__ = ["ancestral_sample"]


def ancestral_sample(model, variance, n_steps: int, shape, generator: torch.Generator | None = None,
                     callback: Callable[[dict], None] | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """Samples of ``shape`` (B, ...) from the ``n_steps``-step model (DDPM's grid t_n = n·T/N) with
    reverse variances ``variance`` ("posterior", "step", "learned" for the model's own head, an
    AnalyticVariance or a LearnedVariance):
    :func:`sdeflow.samplers.sample` with the "ancestral" method on the uniform grid from T to 0.
    ``generator`` draws the prior and every noise; ``callback`` gets the sampler's {"i", "t", "x", ...}
    after every step (t is t_{n−1}). ``device``/``dtype`` default to the model's."""
    check_variance(variance)
    settings = SamplerSettings("ancestral", n_steps=check_positive_int("n_steps", n_steps), grid="uniform",
                               t_min=0.0, options={"variance": variance})
    return sample(model, shape, settings, generator=generator, callback=callback, device=device, dtype=dtype)
