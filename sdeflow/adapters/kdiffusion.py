r"""Denoisers D(x; σ) (k-diffusion, EDM) as sdeflow models.

A denoiser takes a noisy image :math:`x = x_0 + \sigma n` (variance exploding, no scaling) and its noise
level σ of shape (B,), and returns x̂₀. On any sdeflow SDE, :math:`y_t = m(x_0 + \tilde\sigma n)` with
:math:`\tilde\sigma = \mathrm{std}/m = e^{-\lambda/2}`, so

.. math::  \hat x_0 = D(y/m;\ \tilde\sigma),\qquad \hat\varepsilon = (y - m\,\hat x_0)/\mathrm{std}.

The matching SDE is the VE SDE whose noise level runs from the denoiser's σ_min to σ_max:
:func:`denoiser_sde` = ``VESDE(sigma_min, √(σ_max² + σ_min²))``, so that std(T) = σ_max and the prior is
k-diffusion's N(0, σ_max² I). The denoiser was trained down to σ_min, reached at
:math:`t = T\ln 2/(2\ln(\sigma_{max}'/\sigma_{min}))` (``first_trained_time``), where bounds should start.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model import PluginReverseSDE
from ..sdes.linear import SDE, VESDE
from ..utils import check_positive_float
from .discrete import network_output, noise_from_data

__all__ = ["DenoiserNet", "adapt_denoiser", "denoiser_sde"]


def denoiser_sde(sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0) -> VESDE:
    """The VE SDE with noise level std(t) from 0 through ``sigma_min`` to ``sigma_max`` = std(T)
    (EDM's defaults 0.002 and 80)."""
    sigma_min, sigma_max = check_positive_float("sigma_min", sigma_min), check_positive_float("sigma_max", sigma_max)
    if sigma_max <= sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return VESDE(sigma_min=sigma_min, sigma_max=math.sqrt(sigma_max ** 2 + sigma_min ** 2), T=T)


class DenoiserNet(nn.Module):
    """``net(y, t)`` for sdeflow, returning ε̂ from ``denoiser(x, sigma)`` (see the module docstring);
    ``first_trained_time()`` is the time at which the noise level is ``sigma_min``."""

    def __init__(self, denoiser: nn.Module, sde: SDE, sigma_min: float):
        super().__init__()
        self.denoiser, self.sde, self.sigma_min = denoiser, sde, check_positive_float("sigma_min", sigma_min)

    def first_trained_time(self) -> float:
        return float(self.sde.t_from_log_snr(torch.tensor(-2 * math.log(self.sigma_min), dtype=torch.float64)))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t64 = t.double()
        m = self.sde.mean_weight(t64)
        sigma = torch.exp(-0.5 * self.sde.log_snr(t64))
        scale = (1 / m).to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        x0 = network_output(self.denoiser(y * scale, sigma.to(y.dtype)), y)
        return noise_from_data(self.sde, y, t, x0)


def adapt_denoiser(denoiser: nn.Module, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   sde: SDE | None = None) -> PluginReverseSDE:
    """The sdeflow model of a denoiser ``denoiser(x, sigma) -> x̂₀`` trained on noise levels
    [``sigma_min``, ``sigma_max``], on ``sde`` (default :func:`denoiser_sde`), ε̂-parameterized."""
    sde = denoiser_sde(sigma_min, sigma_max) if sde is None else sde
    return PluginReverseSDE(sde, DenoiserNet(denoiser, sde, sigma_min), "noise")
